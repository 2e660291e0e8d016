"""The local run's defaults (a light module: `segcore --help` reads them)."""

# `segcore pipeline run --local` without flags: a run that takes a couple of minutes on 2 cores
# and visibly learns: 12 epochs x 12 steps take the demo's val mean Dice to 0.73-0.83 (FP32 and
# INT8; still rising steeply, so float rounding moves it). 128x128 costs little more per step
# than 64x64 and gives the stride-8 features room.
LOCAL_DEFAULTS = {
    "template": "Lite-HRNet-s-mod2",
    "epochs": 12,
    "batch_size": 8,
    "input_size": "128x128",
    "subset_size": 16,
    "num_workers": 0,
}
DEMO_DATA = {"num_train": 96, "num_val": 8, "size": (128, 128), "num_classes": 4}
