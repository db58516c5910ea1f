"""The KeyframeFace language model: a causal LM that writes one keyframe's 61 ARKit values as JSON.

Wu et al., "KeyframeFace: From Text to Expressive Facial Keyframes" (2025, arXiv 2512.11321), §4-§5.
One readable file per idea:

``prompts``   the request/answer formats (§4; semantic vs non-semantic, §5.1) and Algorithm 1's
              one-request-per-keyframe loop;
``parsing``   answers back to vectors, never raising;
``data``      (request, answer) -> token ids with the loss on the answer only;
``lora``      the §5.2 adapter (r = 8, α = 32, every linear layer);
``generate``  plain greedy decoding and the grammar-constrained fast path;
``tiny``      the offline stand-in model (random weights, Qwen3 architecture, tokenizer trained here);
``scripts``   §4.1's first stage: free text -> a script, decoded under the script's JSON schema;
``job``       the job schema; ``loop`` the Ray Train worker loop; ``servable`` build + reload.

Nothing is imported or built at import time.
"""

from facelab.families.base import Family
from facelab.families.keyframe_lm.job import METRICS, KeyframeJob

FAMILY = Family(
    kind="keyframe",
    job=KeyframeJob,
    metrics=METRICS,
    task="keyframes",
    worker_loop="facelab.families.keyframe_lm.loop:worker_loop",
    load_servable="facelab.families.keyframe_lm.servable:load",
    lineage="facelab.families.keyframe_lm.servable:lineage",
    servable_info="facelab.families.keyframe_lm.servable:servable_info",
    shared_base="facelab.families.keyframe_lm.adapters:AdapterSet",
    add_cli="facelab.families.keyframe_lm.tiny:add_cli",
    script_writer="facelab.families.keyframe_lm.scripts:script_writer",
    description="KeyframeFace: LoRA-tuned causal LM writing 61 ARKit values per keyframe as JSON (2025)",
)
