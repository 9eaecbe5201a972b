"""The `embed` stage (`embed`), torchrun part files (`parts`), `run`'s shared pass (`shared`), cohort score offsets (`cohort`)."""
