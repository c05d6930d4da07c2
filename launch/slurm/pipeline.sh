#!/usr/bin/env bash
# Submit the whole recipe to Slurm: SFT, then REDI from the SFT export, then evaluation of the
# final model, chained with --dependency=afterok (a failed stage cancels the ones after it).
#
#   launch/slurm/pipeline.sh --config NAME|PATH [--nodes N] [--gpus-per-node G] [--partition P]
#                            [--time T] [--account A] [--qos Q] [--sbatch "more sbatch options"]
#                            [--section.key value ...]
#
# Dotted overrides apply to both training stages and to the eval settings (the config's `eval`
# section: benchmarks, samples, max_new_tokens, limit; math500 when it names none). The REDI stage
# always starts from {run.output_dir}/sft/export. Prints the job ids and where each stage writes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${REDI_DS_PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

usage() { sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

config=tiny
nodes=1
gpus=""
sbatch_opts=()
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --config|--nodes|--gpus-per-node|--partition|--time|--account|--qos|--sbatch)
            [ $# -ge 2 ] || { echo "pipeline.sh: $1 needs a value" >&2; exit 2; }
            opt=$1; val=$2; shift 2 ;;
        --config=*|--nodes=*|--gpus-per-node=*|--partition=*|--time=*|--account=*|--qos=*|--sbatch=*)
            opt=${1%%=*}; val=${1#*=}; shift ;;
        --*.*=*) overrides+=("$1"); shift; continue ;;
        --*.*)
            [ $# -ge 2 ] || { echo "pipeline.sh: override $1 has no value" >&2; exit 2; }
            overrides+=("$1" "$2"); shift 2; continue ;;
        *) echo "pipeline.sh: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    case "$opt" in
        --config) config=$val ;;
        --nodes) nodes=$val ;;
        --gpus-per-node) gpus=$val ;;
        --sbatch) read -r -a more <<<"$val"; sbatch_opts+=("${more[@]}") ;;
        *) sbatch_opts+=("$opt=$val") ;;
    esac
done

# Resolve and validate both stages before submitting anything.
resolved=$("$PYTHON" - "$config" "${overrides[@]}" <<'PY'
import os, sys
from redi_ds.config import ConfigError, load_config, stage_names
config, overrides = sys.argv[1], sys.argv[2:]
try:
    names = stage_names(config)
    missing = [s for s in ("sft", "redi") if names and s not in names]
    if missing:
        sys.exit(f"error: config {config!r} has no stage {missing[0]!r} (stages: {', '.join(names)})")
    sft = load_config(config, stage="sft", overrides=overrides)
    redi = load_config(config, stage="redi", overrides=overrides + ["--model.name_or_path", "@sft"])
except ConfigError as e:
    sys.exit(f"error: {e}")
out = os.path.abspath(redi.run.output_dir)
if os.path.abspath(sft.run.output_dir) != out:
    sys.exit("error: run.output_dir differs between the sft and redi stages; REDI reads {output_dir}/sft/export")
ev = redi.eval
print(out)
print(redi.run.name)
print(",".join(ev.benchmarks) or "math500")
print(ev.samples)
print(ev.max_new_tokens)
print(ev.limit)
PY
) || exit 2
{ read -r out; read -r name; read -r benches; read -r samples; read -r max_new; read -r limit; } <<<"$resolved"

logs=$out/slurm
mkdir -p "$logs"
common=(--nodes="$nodes")
[ -n "$gpus" ] && common+=(--gpus-per-node="$gpus")
# the trainer would evaluate at the end of a stage when eval.benchmarks is set: the eval job does it
no_eval=(--eval.benchmarks "[]")

submit() { sbatch --parsable "$@" | cut -d';' -f1; }

sft_id=$(submit --job-name="$name-sft" "${common[@]}" --output="$logs/%x-%j.out" "${sbatch_opts[@]}" \
    "$here/train.sbatch" --stage sft --config "$config" "${overrides[@]}" "${no_eval[@]}")
redi_id=$(submit --job-name="$name-redi" "${common[@]}" --output="$logs/%x-%j.out" "${sbatch_opts[@]}" \
    --dependency="afterok:$sft_id" --kill-on-invalid-dep=yes \
    "$here/train.sbatch" --stage redi --config "$config" "${overrides[@]}" "${no_eval[@]}" \
    --model.name_or_path @sft --model.sft_if_missing false) || { scancel "$sft_id"; exit 1; }
eval_gpus=()
[ -n "$gpus" ] && [ "$gpus" != 0 ] && eval_gpus=(--gpus-per-node=1)
eval_id=$(submit --job-name="$name-eval" --nodes=1 "${eval_gpus[@]}" --output="$logs/%x-%j.out" "${sbatch_opts[@]}" \
    --dependency="afterok:$redi_id" --kill-on-invalid-dep=yes \
    "$here/eval.sbatch" --model "$out/redi/export" --bench "$benches" --samples "$samples" \
    --max-new-tokens "$max_new" --limit "$limit" --out "$out/eval") || { scancel "$sft_id" "$redi_id"; exit 1; }

cat <<MSG
submitted (config $config, $nodes node(s)${gpus:+ x $gpus GPU(s)}):
  sft   job $sft_id   -> $out/sft    (export: $out/sft/export)
  redi  job $redi_id   -> $out/redi   (from $out/sft/export; export: $out/redi/export)
  eval  job $eval_id   -> $out/eval   ($benches, limit $limit, $samples sample(s))
logs: $logs/ (batch scripts), $out/{sft,redi}/slurm-<jobid>/ (per node)
watch: squeue -j $sft_id,$redi_id,$eval_id
MSG
