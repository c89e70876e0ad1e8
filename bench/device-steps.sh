# Sourced by the bench scripts that run several steps in one device call (bench/mixed-length.sh,
# bench/two-gpus.sh). Each step writes under /tmp/o (the OUT that bench/gpu-e2e.sh sees); `snap` tars it into the
# call's own $OUT/all.tgz, so a call cut short at its time limit still brings back every step it finished.
O=$OUT
export OUT=/tmp/o
export QPIPE_E2E_ROOT=${QPIPE_E2E_ROOT:-/tmp/qpipe-e2e}  # gpu-e2e.sh's ROOT, named once for both
R=$QPIPE_E2E_ROOT
mkdir -p "$OUT"
snap() { tar czf "$O/all.tgz" -C /tmp o; }
finish() {
  date -u >>"$OUT/gpus.txt"
  snap
}
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; date -u; } >"$OUT/gpus.txt" 2>&1
