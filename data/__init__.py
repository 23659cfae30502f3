"""Training data: Lotka–Volterra trajectories as LLMTIME text (lotka_volterra.py, llmtime.py, windows.py) and
conversations from JSONL (chat.py). Both become `TrainingData` (windows.py)."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m data.…` is starting (argv[0] is "-m" until the module is found):
    from common.startup import quiet_ctrl_c  # Ctrl-C while torch loads is one line

    quiet_ctrl_c()

from .llmtime import Decoded, Scaler, decode, encode
from .lotka_volterra import Trajectories, load_h5, load_trajectories, save_h5, simulate, split_indices
from .windows import (ForecastTask, TokenWindows, TrainingData, forecast_task, forecasting_data, make_windows,
                      trajectory_texts, window_starts)

__all__ = ["Decoded", "ForecastTask", "Scaler", "TokenWindows", "TrainingData", "Trajectories", "decode", "encode",
           "forecast_task", "forecasting_data",
           "load_h5", "load_trajectories", "make_windows", "save_h5", "simulate", "split_indices", "trajectory_texts",
           "window_starts"]
