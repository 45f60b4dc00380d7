#!/usr/bin/env bash
# Issue 28's adversarial cases rerun by hand as a user runs them (single process, CPU, the built-in
# demo data). Usage: [PART=2] bench/never_lose_r4_rerun.sh WORKDIR (PART=2: only the
# cases after the first part); each case's output is WORKDIR/<case>.log,
# its exit code the log's last line. Results: bench/NEVER_LOSE_R4_RERUN.md.
set -u
W=${1:?WORKDIR}; PY=${PY:-python}; export OMP_NUM_THREADS=1
B="data.root=demo model.name=tiny_cnn_bn data.image_size=16 data.batch_size=32 data.num_workers=0"
mkdir -p "$W"
[ -d "$W/base" ] || $PY launch.py $B output_dir="$W/base" train.epochs=3 >"$W/base.log" 2>&1
fresh() { rm -rf "$W/$1"; cp -a "$W/base" "$W/$1"; }
case_() { local name=$1; shift; "$@" >"$W/$name.log" 2>&1; echo "rc=$?" >>"$W/$name.log"; }
if [ "${PART:-all}" != 2 ]; then
fresh A1; chmod 000 "$W/A1/checkpoints/epoch_0002.pt"; (cd "$W/A1" && find . -type f ! -name .lock -exec md5sum {} + | sort >"$W/A1.before")
case_ A1 setpriv --bounding-set=-dac_override,-dac_read_search $PY launch.py $B output_dir="$W/A1" train.epochs=5
(cd "$W/A1" && find . -type f ! -name .lock -exec md5sum {} + | sort >"$W/A1.after")
fresh A1dir; rm "$W/A1dir/checkpoints/"{last,epoch_0002,best}.pt; mkdir "$W/A1dir/checkpoints/"{last,epoch_0002}.pt
case_ A1dir $PY launch.py $B output_dir="$W/A1dir" train.epochs=5
fresh A2; rm "$W/A2/checkpoints/"{last,epoch_0002}.pt
case_ A2 $PY launch.py $B output_dir="$W/A2" train.epochs=4
fresh A3; case_ A3 unshare -m sh -c 'mount --bind -o ro "$0" "$0" && exec "$@"' "$W/A3/checkpoints" $PY launch.py $B output_dir="$W/A3" train.epochs=4
fresh B4; case_ B4 $PY launch.py $B output_dir="$W/B4" train.epochs=4 optim.momentum=0.5
case_ B4b $PY launch.py $B output_dir="$W/B4" train.epochs=5 optim.momentum=0.5
fresh B5; case_ B5 $PY launch.py $B output_dir="$W/B5" train.epochs=4 optim.norm_weight_decay=0.01
fresh B7; case_ B7 $PY launch.py $B output_dir="$W/B7" train.epochs=4 optim.name=adamw
case_ D $PY - "$W" <<'PY'
import sys, ddp_trainer
w = sys.argv[1]
r = ddp_trainer.train(data={"root": "demo", "image_size": 16, "batch_size": 32, "num_workers": 0},
                      model={"name": "tiny_cnn_bn"}, output_dir=w + "/D", **{"train.epochs": 1})
last = r.checkpoints["last"]
print("stored", ddp_trainer.evaluate(last)["val_loss"])
print("config", ddp_trainer.evaluate(last, config=r.config)["val_loss"])
print("partial", ddp_trainer.evaluate(last, config={"data": {"batch_size": 4}})["val_loss"])
try:
    print("other", ddp_trainer.evaluate(last, **{"model.name": "tiny_cnn"}))
except Exception as e:
    print("other raised", type(e).__name__, e)
PY
case_ E $PY -c "
import threading; from PIL import Image; from ddp_trainer.data import decode
print('before', Image.MAX_IMAGE_PIXELS)
import ddp_trainer.data.datasets
print('after import', Image.MAX_IMAGE_PIXELS)"
fresh F8; case_ F8 $PY launch.py $B output_dir="$W/F8" train.epochs=4 log.tensorboard=true
fresh F10; rm "$W/F10/metrics.jsonl" "$W/F10/train.log"; cp "$W/F10/metrics.csv" "$W/F10.csv.before"
case_ F10 $PY launch.py $B output_dir="$W/F10" train.epochs=4
fresh F10b; printf '\xff\xfe not utf-8\n' >>"$W/F10b/metrics.jsonl"
case_ F10b $PY launch.py $B output_dir="$W/F10b" train.epochs=4
fresh G1; case_ G1 $PY launch.py $B output_dir="$W/G1" train.epochs=4 checkpoint.keep_last=0
fresh G2; for i in 1 2 3; do $PY launch.py $B output_dir="$W/G2" train.epochs=1 resume=none overwrite=true >"$W/G2.$i.log" 2>&1; done; ls -R "$W/G2/replaced" >"$W/G2.log" 2>&1
case_ G3 $PY launch.py $B output_dir="$W/G3" train.epochs=1 data.sampler=repeated_augment data.ra_repeats=1000000000
case_ H1 $PY -m ddp_trainer inspect "$W/base/checkpoints"
case_ H2 $PY -m ddp_trainer convert "$W/base/checkpoints" "$W/H2.pt"
case_ H3 $PY -m ddp_trainer evaluate "$W/base/checkpoints"
fresh H4; case_ H4 $PY launch.py $B output_dir="$W/H4" train.epochs=4 resume="$W/H4/checkpoints"
$PY -c "import zipfile; z = zipfile.ZipFile('$W/foreign.pt', 'w'); z.writestr('a.txt', 'x'); z.close()"
case_ H5 $PY -m ddp_trainer inspect "$W/foreign.pt"
mkdir -p "$W/imgs"; $PY -c "
from PIL import Image; Image.new('RGB', (16, 16)).save('$W/imgs/b_good.jpg')"; echo text >"$W/imgs/a_bad.jpg"
case_ H6 $PY -m ddp_trainer predict "$W/base/checkpoints/last.pt" "$W/imgs/a_bad.jpg" "$W/imgs/b_good.jpg"
fresh I1; case_ I1a $PY launch.py $B output_dir="$W/I1" train.epochs=4 data.sampler=class_balanced
fi
# B with SGD (the default optimizer is adamw, which has no momentum)
rm -rf "$W/B4s"; $PY launch.py $B output_dir="$W/B4s" train.epochs=2 optim.name=sgd optim.lr=0.05 >"$W/B4s.0.log" 2>&1
case_ B4s $PY launch.py $B output_dir="$W/B4s" train.epochs=3 optim.name=sgd optim.lr=0.05 optim.momentum=0.5 optim.nesterov=true
case_ B4s.saved $PY -c "import torch; s = torch.load('$W/B4s/checkpoints/last.pt', weights_only=False); print([{k: g[k] for k in ('momentum', 'nesterov', 'weight_decay')} for g in s['optimizer']['param_groups']])"
fresh B7s; case_ B7s $PY launch.py $B output_dir="$W/B7s" train.epochs=4 optim.name=sgd optim.lr=0.05
case_ H3 $PY -m ddp_trainer evaluate --checkpoint "$W/base/checkpoints"
case_ H6 $PY -m ddp_trainer predict --checkpoint "$W/base/checkpoints/last.pt" "$W/imgs/a_bad.jpg" "$W/imgs/b_good.jpg"
case_ E2 $PY -c "
import threading; from PIL import Image
from ddp_trainer.data.decode import decode_rgb
Image.new('RGB', (64, 64)).save('$W/imgs/big.png'); data = open('$W/imgs/big.png', 'rb').read()
before = Image.MAX_IMAGE_PIXELS
def go():
    for _ in range(300): decode_rgb(data, 'big.png', 10**12)
ts = [threading.Thread(target=go) for _ in range(2)]; [t.start() for t in ts]; [t.join() for t in ts]
print('guard before', before, 'after', Image.MAX_IMAGE_PIXELS)"
