"""The methods ``ortho-lora compare`` runs when ``--methods`` is not given (study/compare.py runs them; the CLI's
help names them). A module of its own, importing nothing, so that building the CLI's parser stays cheap."""

DEFAULT_METHODS = (
    "single",
    "joint",
    "ortho-factor",
    "norm_balance-global",
    "norm_balance-factor",
    "upgrad-global",
    "imtl_g-global",
    "cagrad-global",
    "mgda-global",
    "famo-global",
    "initial_loss-global",
    "lossweights",
)
