"""emocircuits: find and control the circuits through which a language model expresses emotion.

A TransformerLens (``TransformerBridge``) plugin implementing "Do LLMs 'Feel'? Emotion
Circuits Discovery and Control" (2025) as composable analysis functions.
"""

from . import (
    circuits,
    components,
    control,
    data,
    directions,
    elicitation,
    emotions,
    evaluate,
    judges,
    patching,
    probes,
    prompts,
    sites,
    steering,
    story_directions,
)
from .activations import Activations, collect
from .circuits import modulate
from .directions import EmotionDirections
from .emotions import EKMAN6, EmotionSet, emotion_set
from .generation import GenerationConfig, GenerationResult, generate
from .judges.readout import emotion_readout
from .models import load_model
from .progress import progress_enabled, set_progress
from .prompts import Prompt, TokenBatch, tokenize
from .steering import steer

__version__ = "0.1.0"

__all__ = [
    "Activations", "EKMAN6", "EmotionSet", "collect", "GenerationConfig", "GenerationResult", "Prompt", "TokenBatch",
    "EmotionDirections", "circuits", "components", "control", "data", "directions", "elicitation",
    "emotion_readout", "evaluate", "modulate", "patching", "probes", "steer", "steering", "story_directions", "emotion_set", "emotions", "generate", "judges", "load_model",
    "progress_enabled", "prompts", "set_progress", "sites", "tokenize",
]
