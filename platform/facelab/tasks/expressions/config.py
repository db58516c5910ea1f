"""Job blocks every expressions-task family shares: the EmoAva data block and the test-split evaluation (CTEG Appendix D, §5.3 baselines)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facelab.core.config import Strict

LISTENER_METRICS = ("l2", "fd", "variation", "pfd")
"""The ``test/<metric>`` names of ``eval.protocol: listener``, in Table 5's order (L2, FD, Variation, P-FD)."""


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
    protocol: Literal["emoava", "listener"] = Field(
        "emoava",
        description=(
            "Which test metrics: 'emoava' = the six of CTEG Appendix D (Table 2: Cppl, DoT, FgD, Diversity, "
            "MModality, Variation); 'listener' = LM-Listener's evaluate_listener.py (CTEG Table 5: L2, FD, "
            "Variation, P-FD), which needs the speaker frames of an LM-Listener dataset (`facelab data "
            "build-lm-listener` / `import-lm-listener`). Baseline rows follow the same protocol."
        ),
    )
    extra_max_frames: list[int] = Field(
        [],
        description=(
            "More generation limits (MSL) to score the same trained model at, evaluation only (Table 2's "
            "'CTEG (MSL = 64)' is [64]): metrics test<N>/<metric> for DoT, FgD, Diversity, MModality, Variation; "
            "no Cppl (the paper's '/': teacher forcing does not depend on the generation limit)."
        ),
    )
    shuffle_row: bool = Field(
        False,
        description=(
            "Also score Table 2's Shuffle row with this trained model (metrics shuffle/<metric>): every test "
            "sequence with its frames permuted in time; Cppl is this model's teacher-forced likelihood of the "
            "shuffled sequences (§5.3), the other five metrics those of the shuffled sequences."
        ),
    )
    cppl_first_step: bool = Field(
        False,
        description=(
            "Cppl also scores a first step whose target is the start frame (the training-set mean face), as the "
            "reference evaluator scores its [CLS] step; a model that starts from the mean face is given it, so "
            "the step adds the metric's floor term and one step per sequence. false = only the T frames and the "
            "terminator are predicted steps (Eq. 18 over the sequence)."
        ),
    )

    @model_validator(mode="after")
    def _listener_rows(self) -> "ExpressionEval":
        if self.protocol == "listener" and (self.extra_max_frames or self.shuffle_row):
            raise ValueError(
                "extra_max_frames and shuffle_row are rows of the emoava protocol (Table 2); with protocol "
                "'listener' leave them empty / false"
            )
        return self

    @model_validator(mode="after")
    def _extra_limits(self) -> "ExpressionEval":
        bad = [n for n in self.extra_max_frames if n < 1]
        if bad:
            raise ValueError(f"extra_max_frames: every limit must be >= 1, got {bad}")
        if len(set(self.extra_max_frames)) != len(self.extra_max_frames) or self.max_frames in self.extra_max_frames:
            raise ValueError(
                f"extra_max_frames {self.extra_max_frames}: each limit once, and not eval.max_frames "
                f"({self.max_frames}) itself (that is the test/ row)"
            )
        return self
