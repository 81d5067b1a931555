"""The base of every recipe section: unknown keys are errors, and a validated recipe does not change."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
