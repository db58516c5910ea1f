"""Job blocks every expressions-task family shares: the EmoAva data block and the test-split evaluation (CTEG Appendix D, §5.3 baselines)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from facelab.core.config import Strict


class ExpressionData(Strict):
    path: str = Field("data/emoava", description="Dataset directory (DVC output), relative to the project root.")
    max_frames: int = Field(
        256, ge=1, description="Training sequences are cut to this many frames (the paper's MSL, §5.1)."
    )
    train_subset: int | None = Field(
        None, ge=1, description="Use only the first N training pairs (quick runs); null = all."
    )
    dev_subset: int | None = Field(None, ge=1, description="Use only the first N dev pairs for validation; null = all.")


class ExpressionEval(Strict):
    """Test-split evaluation after training (paper Appendix D) and the §5.3 baselines."""

    baseline: Literal["gt", "shuffle", "random"] | None = Field(
        None,
        description="null = train and evaluate CTEG; gt | shuffle | random = evaluate that §5.3 baseline row instead (no training).",
    )
    max_frames: int = Field(
        256, ge=1, description="Maximum generated sequence length (MSL) at evaluation (Table 2: 256 and 64)."
    )
    n_diversity: int = Field(750, ge=2, description="Pairs of text-free generations for Diversity (Eq. 11, N_d).")
    n_mmodality: int = Field(1500, ge=1, description="Texts with two samples each for MModality (Eq. 12, N_m).")
    n_bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the standard errors.")
    max_texts: int | None = Field(
        None, ge=1, description="Evaluate on the first N test pairs only (quick runs); null = all 1,500."
    )
    batch_size: int = Field(64, ge=1, description="Sequences decoded in parallel.")
    delta: float = Field(0.8, gt=0, description="Cppl box half-width δ (Eq. 16).")
    sigma: float = Field(0.2, gt=0, description="Cppl Gaussian σ (Eq. 17).")
    cppl_region: Literal["cdf_difference", "box"] = Field(
        "cdf_difference", description="Cppl probability: the reference's CDF difference F(x+δ)−F(x−δ), or the box mass."
    )
    enabled: bool = Field(True, description="Run the test-split evaluation after the last epoch.")
