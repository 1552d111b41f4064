# Source this at the start of a device-tool command: installs the carried wheels (.whl/) that the GPU machine lacks
# into /tmp/site and puts the repo on PYTHONPATH. The device image has torch, triton and transformers; see
# benchmarks/README of the device notes in CONTRIBUTING.md.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
