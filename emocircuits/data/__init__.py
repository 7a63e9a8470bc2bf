"""Data: SEV records (loader, validator, writer, checker) and labeled utterances."""

from emocircuits.data.sev import (
    VALENCES,
    DataProblem,
    EmotionWordHit,
    SEVDataset,
    SEVProblem,
    SEVRecord,
    SEVValidationError,
    check_no_emotion_words,
    load_sev,
    save_sev,
    validate_sev,
)
from emocircuits.data.utterances import (
    Utterance,
    UtteranceSet,
    UtteranceStats,
    check_utterances,
    has_emotion_keyword,
    load_utterances,
)
from emocircuits.prompts import emotion_prompts, neutral_prompts

__all__ = [
    "Utterance",
    "UtteranceSet",
    "UtteranceStats",
    "check_utterances",
    "has_emotion_keyword",
    "load_utterances",
    "emotion_prompts",
    "neutral_prompts",
    "VALENCES",
    "EmotionWordHit",
    "SEVDataset",
    "DataProblem",
    "SEVProblem",
    "SEVRecord",
    "SEVValidationError",
    "check_no_emotion_words",
    "load_sev",
    "save_sev",
    "validate_sev",
]
