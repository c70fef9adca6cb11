"""The decode pipeline between the HF layers and the store: placing chosen chunks (fetch), staging disk
reads ahead of need (prefetcher), predicting choices (predictor), and the policies that pace it all
(policies, with their tuning in one dataclass)."""

from .fetch import Fetcher, Placement
from .installs import Installs
from .policies import (AdmissionGate, GuessSampler, PipelineTuning, PrefetchGate, PromotionCadence,
                       StepWindow)
from .predictor import HitCounter, Predictor
from .prefetcher import PrefetchError, Prefetcher, PrefetchStats
from .timers import HostTimers

__all__ = ["AdmissionGate", "Fetcher", "GuessSampler", "HitCounter", "HostTimers", "Installs", "PipelineTuning", "Placement",
           "PrefetchError", "PrefetchGate", "PrefetchStats", "Prefetcher", "Predictor", "PromotionCadence",
           "StepWindow"]
