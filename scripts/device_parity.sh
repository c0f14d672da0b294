#!/bin/bash
# Device call (16 CPU cores; the reference on the CPU): the issue-4 parity matrix, then the
# issue-5 width x precision validations, then (PI5=1) the Raspberry Pi 5 export. $OUT gets the results.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=2
for d in kernels export runtimes targets; do ln -sfn ../$d edgeseq/$d; done
lscpu | grep "Model name"
t0=$(date +%s)
timeout ${PARITY_S:-270} python3 scripts/parity_matrix.py --out $OUT/parity --work /tmp/parity_${REF:-cpu} --jobs 6 --threads 2 --device ${REF:-cpu} > $OUT/parity.log 2>&1
echo "parity rc=$? $(( $(date +%s) - t0 ))s"; tail -15 $OUT/parity.log
rm -f $OUT/parity/*.png $OUT/parity/manifest.json
if [ "${PI5:-0}" = 1 ]; then
  (timeout 300 python3 -m edgeseq.cli export --target raspberry-pi-5 --device cpu --threads 2 -o /tmp/pi5 \
     > $OUT/pi5.log 2>&1; echo "pi5 rc=$?" >> $OUT/pi5.log; cp /tmp/pi5/manifest.json $OUT/pi5_manifest.json) &
fi
[ "${QUANT:-1}" = 0 ] && exit 0
t0=$(date +%s)
timeout 300 python3 scripts/quant_table.py --out $OUT/quant --work /tmp/quant --jobs 7 --no-bench --device cpu > $OUT/quant.log 2>&1
echo "quant rc=$? $(( $(date +%s) - t0 ))s"; tail -14 $OUT/quant.log
wait; [ -f $OUT/pi5.log ] && tail -5 $OUT/pi5.log
