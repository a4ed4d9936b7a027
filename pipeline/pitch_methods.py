"""The pitch methods' names, and the two without a network (pm, harvest), in a module without
torch: the ingress (which validates f0Method) and the command line's parser read the names, and
the host pitch replicas run pm and harvest, without loading the models' code."""

import numpy as np

from pipeline.audio import SAMPLE_RATE

CREPE_METHODS = ("crepe", "crepe-tiny")
# Methods without a network: no weights, no device, nothing to batch; harvest is slow (~0.3 CPU s
# and ~7 MB per audio second, whole), and both are deterministic. Each needs its library.
HOST_METHOD_MODULES = {"pm": "parselmouth", "harvest": "pyworld"}
HOST_METHODS = tuple(HOST_METHOD_MODULES)
PITCH_METHODS = (*CREPE_METHODS, "rmvpe", *HOST_METHODS)

F0_MIN = 50.0
F0_MAX = 1100.0
HOP_LENGTH = SAMPLE_RATE // 100  # 10 ms f0 frames, every method's
_PM_VOICING_THRESHOLD = 0.6


def host_f0(method: str, audio_pad: np.ndarray, p_len: int) -> np.ndarray:
    """The f0 track in Hz (0 = unvoiced) of a method without a network, before the job's filter
    radius and key: `pm_f0` or `harvest_f0` of the 16 kHz padded input."""
    if method == "pm":
        return pm_f0(audio_pad, p_len)
    if method == "harvest":
        return harvest_f0(audio_pad)
    raise ValueError(f"f0 method {method!r} is not one of {', '.join(HOST_METHODS)}")


def pm_f0(audio_pad: np.ndarray, p_len: int) -> np.ndarray:
    """Praat's autocorrelation pitch (10 ms steps, voicing threshold 0.6, 50-1100 Hz) of the
    16 kHz padded input, float64 Hz, zero-padded to `p_len` frames as the reference does: the
    missing frames' larger half on the left. A longer track is kept whole (the p_len cut follows)."""
    import parselmouth  # imported where pm is used

    sound = parselmouth.Sound(np.asarray(audio_pad, dtype=np.float64), SAMPLE_RATE)
    f0 = sound.to_pitch_ac(time_step=HOP_LENGTH / SAMPLE_RATE, voicing_threshold=_PM_VOICING_THRESHOLD,
                           pitch_floor=F0_MIN, pitch_ceiling=F0_MAX).selected_array["frequency"]
    missing = p_len - f0.shape[0]
    return np.pad(f0, ((missing + 1) // 2, missing // 2)) if missing > 0 else f0


def harvest_f0(audio_pad: np.ndarray) -> np.ndarray:
    """WORLD's harvest refined by stonemask (10 ms frames, 50-1100 Hz) of the 16 kHz padded input:
    [L // 160 + 1] float64 Hz. The reference's median filter for harvest is `finish_pitch`'s."""
    import pyworld  # imported where harvest is used

    x = np.ascontiguousarray(audio_pad, dtype=np.float64)
    f0, times = pyworld.harvest(x, fs=SAMPLE_RATE, f0_ceil=F0_MAX, f0_floor=F0_MIN,
                                frame_period=1000 * HOP_LENGTH / SAMPLE_RATE)
    return pyworld.stonemask(x, f0, times, SAMPLE_RATE)
