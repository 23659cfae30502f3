"""Lotka–Volterra data and the LLMTIME text scheme. Read lotka_volterra.py, llmtime.py, windows.py."""

from .llmtime import Decoded, Scaler, decode, encode
from .lotka_volterra import Trajectories, load_h5, load_trajectories, save_h5, simulate, split_indices
from .windows import ForecastTask, TokenWindows, forecast_task, make_windows, trajectory_texts, window_starts

__all__ = ["Decoded", "ForecastTask", "Scaler", "TokenWindows", "Trajectories", "decode", "encode", "forecast_task",
           "load_h5", "load_trajectories", "make_windows", "save_h5", "simulate", "split_indices", "trajectory_texts",
           "window_starts"]
