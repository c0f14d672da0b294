#!/bin/bash
# Device call: the issue-4 parity matrix with the reference on the CPU (PARITY_DEVICE) or
# the issue-5 width x precision table (QUANT=1). Results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=2
for d in kernels export runtimes targets; do ln -sfn ../$d edgeseq/$d; done
lscpu | grep "Model name"
t0=$(date +%s)
if [ "${QUANT:-0}" = 1 ]; then
  # the Raspberry Pi 5 export (no width: the sizing model picks) beside the table
  [ "${PI5:-1}" = 1 ] && (timeout 560 python3 -m edgeseq.cli export --target raspberry-pi-5 --device cpu --threads 2 -o /tmp/pi5 \
     > $OUT/pi5.log 2>&1; echo "pi5 rc=$?" >> $OUT/pi5.log; cp /tmp/pi5/manifest.json $OUT/pi5_manifest.json) &
  timeout 560 python3 scripts/quant_table.py --out $OUT/quant --work /tmp/quant --jobs 7 --no-bench --device cpu > $OUT/quant.log 2>&1
  echo "quant rc=$? $(( $(date +%s) - t0 ))s"; tail -16 $OUT/quant.log
  wait; tail -12 $OUT/pi5.log
else
  timeout 560 python3 scripts/parity_matrix.py --out $OUT/parity --work /tmp/parity --jobs 6 --threads 2 --device ${PARITY_DEVICE:-cpu} > $OUT/parity.log 2>&1
  echo "parity rc=$? $(( $(date +%s) - t0 ))s"; tail -15 $OUT/parity.log
  rm -f $OUT/parity/*.png
fi
