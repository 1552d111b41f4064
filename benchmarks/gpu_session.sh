#!/usr/bin/env bash
# One GPU session's measurements, one stage per device call (each within the 10-minute limit), run back to back
# while the machine stays warm. Usage on the device machine, from the repo root:
#   bash benchmarks/gpu_session.sh STAGE
# Stages:
#   setup      install the carried wheels (.whl/) into /tmp/site (kept while the machine is warm), import check,
#              GPU test files of the kernels
#   kernels    kernel/selection timing: benchmarks.selection, benchmarks.vertical_slash
#   issue4     attnkit bench: llama3-8b shape (32K-128K) and the embedded model (2K-8K), dense vs patched
#   smol       benchmarks.quality on the embedded model (SmolLM2 GGUF staged in /root/attnkit-models), 4K/8K
#   qwen       benchmarks.quality on qwen (GGUF staged), 16K/32K
#              (both: RECIPES=a,b,... overrides the recipe list, TAG=name the JSON's suffix)
#   bench-qwen attnkit bench on qwen at 16K/32K on corpus text, each dynamic method vs dense (selection/gate cost
#              included); RECIPES overrides the list
#   fsdp2      issue 10, on nvidia-h200-x2: SeerAttention gate distillation and linearization's attention transfer
#              (RECIPES, default seer_attention,benchmarks/recipes/lolcats-transfer.yaml) of MODEL (default: the
#              embedded model, staged) on one GPU with batch 2, then on two GPUs with FSDP2 and batch 1 each (the
#              same global batch), compared by benchmarks.distill_compare (losses, trained tensors, tokens/s).
#              MODEL=random:llama3-8b:32 for a model that is sharded for real; STEPS, SEQ override 30 × 4096 tokens
#   quest      Quest: GPU kernel tests, then benchmarks.quest (decode attention at 32K/64K/128K, batch 1 and 8, vs
#              dense SDPA and a naive gather; time per output token of a random 32-layer Llama-3-8B at 128K)
#   quest-graph  Quest's CUDA-graph decode: GPU tests of generate_graphed and the rerank kernel, TPOT of real
#              generation (attnkit.generate_graphed) per variant at b1/128K, part 1 with --rerank-pages 256
#   quest-profile  Quest's GPU tests (log in $OUT), the 128K kernel points (b1, b8: whole step with the fused bounds
#              update, attention launch settings), then the kernels of one CUDA-graph decode step of the 32-layer model
#              (b1, 128K: dense-buffered vs GQA-shared int8, --profile-graph: launches, device µs, time between kernels)
#   quest-tpot real-generation TPOT (generate_graphed) at BATCH rows of 128K (default 3, what an H100 holds; 4 needs
#              an H200): dense-buffered, Quest per head, Quest GQA-shared int8 (~230 s on an H100)
#   quest-smol benchmarks.quality of Quest on the embedded model, 4K/8K, budgets 256/512/1024 (+1024 GQA-shared)
#   quest-qwen benchmarks.quality of Quest on qwen, 16K/32K, budgets 1024/2048
#   conversion benchmarks.conversion quality on the embedded model (SmolLM2 GGUF staged) and tiny-qwen2, fp32:
#              NLL on held-out corpus + passkey/niah_single at 2K/4K, original / converted / recovered (200 steps)
#   conversion-qwen  the same on qwen (GGUF staged), gqa (2 → 1 KV heads) and mla (latent 96 + rope 32, and 192 + 32)
#   conversion-decode  benchmarks.conversion decode: llama3-8b shape (4 layers, random weights), original vs GQA
#              8 → 2 vs MLA 512 + 64, 8K-128K at batch 1 and 8K/32K at batch 8
#   linear     linear attention (issue 9): the linear-attention GPU tests (fla vs the reference) and
#              benchmarks.linear (attention level: prefill and decode, dense SDPA vs attnkit linear vs fla's kernel vs
#              the PyTorch references, 4K-128K); needs the fla-core, flash-linear-attention and einops wheels in .whl/
#   linear-bench  attnkit bench on a random llama3-8b shape (4 layers): dense vs linear (RECIPE=linear-untrained) or
#              vs the LoLCATs window hybrid (RECIPE=lolcats-untrained), TTFT/TPOT/peak memory/KV bytes, 4K-128K
#   linear-smol  benchmarks.linear_quality on the embedded model (GGUF staged): dense vs hedgehog vs lolcats vs the
#              lolcats layer hybrid, held-out NLL and task scores at 1K/2K, with training tokens and time
#   store      keep every carried model part (.devstage/NAME/chunk, see ../shared/device/stage-model) in
#              /root/attnkit-models/parts/NAME, so parts can arrive in any order, riding along other stages
#   assemble   join the parts into the two GGUF files (s* -> SmolLM2, q* -> qwen) and check their SHA256
# Everything it writes goes to $OUT (the device tool brings it back).
# Durations seen on an H100 (2026-12-05), to plan the 10-minute calls: quest ~125 s (tests 61 s) + ~100 s of TPOT;
# conversion-decode b1 ~140 s, b8 ~60 s; linear (benchmark only, 4 lengths, --repeat 5) ~60 s; quest-smol > 200 s,
# linear-smol > 150 s, conversion > 200 s for the smol gqa recipe alone (these three got no further within those
# limits: give each its own call). 2026-12-06: quest-profile ~260 s, quest-tpot (BATCH=3) ~230 s. Stages pipe through `tail`, so a stage killed by `timeout` prints nothing: tee
# to a file under $OUT when running one under a limit. assemble needs .devstage/SHA256 carried along.
set -uo pipefail
stage=${1:?stage}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SMOL=/root/attnkit-models/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN=/root/attnkit-models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
DEFAULT_RECIPES=benchmarks/recipes/xattention-recall95.yaml,minference,flexprefill

# A machine that went cold lost /tmp/site: reinstall the carried wheels when they are here and not installed.
if [ "$stage" != setup ] && [ -d .whl ] && ! [ -d /tmp/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
case "$stage" in
  store)
    mkdir -p /root/attnkit-models/parts
    for d in .devstage/*/; do [ -f "$d/chunk" ] && cp "$d/chunk" "/root/attnkit-models/parts/$(basename "$d")"; done
    ls -la /root/attnkit-models/parts
    ;;
  assemble)
    cd /root/attnkit-models || exit 1
    ls parts/s* >/dev/null 2>&1 && cat $(ls parts/s* | sort) > SmolLM2-135M-Instruct.Q4_1.gguf
    ls parts/q0* >/dev/null 2>&1 && [ "$(ls parts/q0* | wc -l)" = 9 ] && cat $(ls parts/q0* | sort) > Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
    cd - >/dev/null; grep -F "$(ls /root/attnkit-models/*.gguf)" .devstage/SHA256 | sha256sum -c
    ;;
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    python3 -c "import torch, triton, transformers, lm_eval, datasets, gguf, pydantic, attnkit; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__, torch.cuda.get_device_name())"
    python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernel.py tests/test_vertical_slash_kernel.py \
      tests/test_antidiagonal_kernel.py tests/test_pooled_attention.py tests/test_gpu_models.py 2>&1 | tail -25
    ;;
  kernels)
    python3 -m benchmarks.selection --out "$OUT/selection.json" 2>&1 | tail -40
    python3 -m benchmarks.vertical_slash --out "$OUT/vertical_slash.json" 2>&1 | tail -30
    ;;
  issue4)
    python3 -m attnkit bench --shape llama3-8b --layers 2 --recipe sliding_window --lengths 32k,64k,128k \
      --new-tokens 16 --out "$OUT/bench-llama3-8b" 2>&1 | tail -25
    python3 -m attnkit bench --model "$SMOL" --recipe streaming_llm --lengths 2k,4k,8k --out "$OUT/bench-smol" 2>&1 | tail -25
    ;;
  smol)
    python3 -m benchmarks.quality --model "$SMOL" --dtype bfloat16 --recipes "${RECIPES:-$DEFAULT_RECIPES}" \
      --lengths 4096,8192 --tasks passkey,niah_single,niah_multikey --samples 20 --calibration-length 8192 \
      --out "$OUT/quality-smol${TAG:+-$TAG}.json" 2>&1 | grep -v "it/s\]" | tail -60
    ;;
  qwen)
    python3 -m benchmarks.quality --model "$QWEN" --dtype bfloat16 --recipes "${RECIPES:-$DEFAULT_RECIPES}" \
      --lengths 16384,32768 --fidelity-lengths 16384 --tasks passkey,niah_single --samples 10 --calibration-length 16384 \
      --out "$OUT/quality-qwen${TAG:+-$TAG}.json" 2>&1 | grep -v "it/s\]" | tail -60
    ;;
  bench-qwen)
    for r in $(echo "${RECIPES:-xattention,minference,flexprefill,benchmarks/recipes/seer-train16k.yaml}" | tr , ' '); do
      python3 -m attnkit bench --model "$QWEN" --dtype bfloat16 --recipe "$r" --lengths 16k,32k --text corpus \
        --new-tokens 16 --out "$OUT/bench-qwen-$(basename "$r" .yaml)" 2>&1 | grep -v "it/s\]" | tail -14
    done
    ;;
  fsdp2)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: never multicast
    python3 -c "import torch; print(torch.cuda.device_count(), 'GPUs')"
    model=${MODEL:-$SMOL}; tag=$(basename "$model" | tr ':' '-')
    for recipe in $(echo "${RECIPES:-seer_attention,benchmarks/recipes/lolcats-transfer.yaml}" | tr , ' '); do
      name=$tag-$(basename "$recipe" .yaml)
      common=(--model "$model" --recipe "$recipe" --steps "${STEPS:-30}" --seq-len "${SEQ:-4096}" --overwrite)
      CUDA_VISIBLE_DEVICES=0 python3 -m attnkit distill "${common[@]}" --batch-size 2 --out "$OUT/distill-$name-1gpu" \
        2>&1 | grep -v "it/s\]" | tail -8
      python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml -m attnkit distill \
        "${common[@]}" --batch-size 1 --out "$OUT/distill-$name-2gpu-fsdp2" 2>&1 | grep -v "it/s\]" | tail -8
      python3 -m benchmarks.distill_compare "$OUT/distill-$name-1gpu" "$OUT/distill-$name-2gpu-fsdp2" \
        --out "$OUT/distill-$name-compare.json"
      rm -f "$OUT"/distill-*/model.safetensors  # the base weights are not a result (and too large to bring back)
    done
    ;;
  quest)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_quest_kernels.py 2>&1 | tail -5
    python3 -m benchmarks.quest --out "$OUT" 2>&1 | tail -30
    ;;
  quest-graph)
    # The fixed-capacity cache and generate_graphed (decode replayed from a CUDA graph while the context advances),
    # the rerank kernel, then real generation timed per variant (b1, 128K) and part 1 with a reranked shortlist.
    python3 -m pytest -q -x -p no:cacheprovider tests/test_quest.py -k "graphed or fixed_capacity or rerank" 2>&1 | tail -5
    python3 -m pytest -q -x -p no:cacheprovider tests/test_quest_kernels.py -k "candidate or device" 2>&1 | tail -5
    python3 -m benchmarks.quest --lengths "" --model-layers 32 --model-length 128k --new-tokens 16 \
      --sdpa-backends flash --generate-graphed --out "$OUT" 2>&1 | grep -v Warning | tail -14
    python3 -m benchmarks.quest --lengths 128k --batches 1,8 --rerank-pages 256 --no-model --out "$OUT" 2>&1 | tail -6
    ;;
  quest-profile)
    python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_quest_kernels.py tests/test_quest.py 2>&1 \
      | tee "$OUT/quest-gpu-tests.log" | tail -5
    python3 -m benchmarks.quest --lengths 128k --batches 1,8 --no-model --out "$OUT" 2>&1 | grep -v Warning \
      | tee "$OUT/kernels-128k.log" | tail -6
    python3 -m benchmarks.quest --lengths "" --model-layers 32 --model-length 128k --new-tokens 8 --sdpa-backends flash \
      --variants dense-buffered,quest-shared-int8 --profile-graph 3 --out "$OUT" 2>&1 | grep -v Warning \
      | tee "$OUT/profile-graph-b1-128k.log" | tail -80
    ;;
  quest-tpot)
    # Real generation (generate_graphed) only: its fixed-capacity cache is allocated once; 3 rows of 128K fit an
    # 80 GB H100 beside the weights (BATCH=4 needs an H200: call with needs_h200).
    python3 -m benchmarks.quest --lengths "" --model-layers 32 --model-length 128k --model-batch "${BATCH:-3}" \
      --new-tokens 16 --variants dense-buffered,quest,quest-shared-int8 --only-generate-graphed --prefill-chunk 8192 \
      --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/generate-graphed-b${BATCH:-3}-128k.log" | tail -12
    ;;
  quest-smol)
    python3 -m benchmarks.quality --model "$SMOL" --dtype bfloat16 \
      --recipes "${RECIPES:-quest:token_budget=256,quest:token_budget=512,quest:token_budget=1024,quest:token_budget=1024:share_gqa_group=true}" \
      --lengths 4096,8192 --tasks passkey,niah_single,niah_multikey --samples 20 \
      --out "$OUT/quality-smol-quest${TAG:+-$TAG}.json" 2>&1 | grep -v "it/s\]" | tail -40
    ;;
  quest-qwen)
    python3 -m benchmarks.quality --model "$QWEN" --dtype bfloat16 \
      --recipes "${RECIPES:-quest:token_budget=1024,quest:token_budget=2048,quest:token_budget=2048:share_gqa_group=true:bounds_dtype=int8,quest:token_budget=1024:page_size=8:sink_pages=1}" \
      --lengths 16384,32768 --fidelity-lengths 16384 --tasks passkey,niah_single --samples 10 \
      --out "$OUT/quality-qwen-quest${TAG:+-$TAG}.json" 2>&1 | grep -v "it/s\]" | tail -40
    ;;
  conversion)
    python3 -m benchmarks.conversion quality --model "$SMOL" --dtype float32 --recipes gqa,mla --recover-steps 200 \
      --seq-len 1024 --eval-tokens 8192 --tasks passkey,niah_single --task-lengths 2048,4096 --samples 10 \
      --out "$OUT/conversion-smol.json" 2>&1 | grep -v "it/s\]" | grep -v "━" | tail -40
    python3 -m benchmarks.conversion quality --model tiny-qwen2 --dtype float32 \
      --recipes gqa,mla:kv_rank=32:rope_dim=16 --recover-steps 200 --seq-len 1024 --eval-tokens 8192 --tasks "" \
      --out "$OUT/conversion-tiny-qwen2.json" 2>&1 | grep -v "━" | tail -20
    ;;
  conversion-qwen)
    python3 -m benchmarks.conversion quality --model "$QWEN" --dtype float32 \
      --recipes gqa,mla,mla:kv_rank=192 --recover-steps 200 --seq-len 1024 --eval-tokens 8192 \
      --tasks passkey,niah_single --task-lengths 4096,16384 --samples 5 \
      --out "$OUT/conversion-qwen.json" 2>&1 | grep -v "it/s\]" | grep -v "━" | tail -40
    ;;
  conversion-decode)
    python3 -m benchmarks.conversion decode --shape llama3-8b --layers 4 --dtype bfloat16 --lengths 8k,32k,64k,128k \
      --batch 1 --out "$OUT/conversion-decode-b1.json" 2>&1 | tail -20
    python3 -m benchmarks.conversion decode --shape llama3-8b --layers 4 --dtype bfloat16 --lengths 8k,32k \
      --batch 8 --out "$OUT/conversion-decode-b8.json" 2>&1 | tail -12
    ;;
  linear)
    python3 -m pytest -q -p no:cacheprovider tests/test_linear_attention.py tests/test_linearize.py -k "fla or gpu or agree" 2>&1 | tail -5
    python3 -m benchmarks.linear --out "$OUT/linear.json" 2>&1 | tail -32
    ;;
  linear-bench)
    r=${RECIPE:-linear-untrained}
    python3 -m attnkit bench --shape llama3-8b --layers 4 --recipe "benchmarks/recipes/$r.yaml" \
      --lengths 4k,16k,32k,64k,128k --new-tokens 32 --out "$OUT/bench-$r" 2>&1 | grep -v "it/s\]" | tail -18
    ;;
  linear-smol)
    python3 -m benchmarks.linear_quality --model "$SMOL" --dtype float32 \
      --recipes "${RECIPES:-hedgehog,lolcats,benchmarks/recipes/lolcats-layer-hybrid.yaml}" --untrained \
      --tasks passkey,niah_single --lengths 1024,2048 --samples 10 --out "$OUT/linear-quality-smol.json" 2>&1 \
      | grep -v "it/s\]" | tail -20
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
