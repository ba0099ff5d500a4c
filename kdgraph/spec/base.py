"""The spec models' common base (``extra="forbid"``, finite numbers) and number types that refuse booleans."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["Int", "Float", "_Strict", "_no_bool"]


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()} (YAML reads true/false/yes/no/on/off "
                         f"as booleans; write a number)")
    return v


#: an int / a finite float that refuses booleans (pydantic would take ``true`` as 1)
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
