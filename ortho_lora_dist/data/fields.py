"""Checking and normalising one record: what its format (data/formats/) reads and stores."""

from ortho_lora_dist.data.formats import check_messages, get_format, text_value

__all__ = ["check_messages", "text_value", "_needed", "_normalise"]


def _needed(cfg) -> list[str]:
    """The raw fields a task's format reads."""
    return get_format(cfg.format).fields(cfg)


def _normalise(row: dict, where: str, cfg) -> dict:
    """The stored record of one raw row (DataError naming ``where`` and the field)."""
    return get_format(cfg.format).normalise(row, where, cfg)
