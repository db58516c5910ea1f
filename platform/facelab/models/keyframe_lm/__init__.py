"""The KeyframeFace language model: a causal LM that writes one keyframe's 61 ARKit values as JSON.

Wu et al., "KeyframeFace: From Text to Expressive Facial Keyframes" (2025, arXiv 2512.11321), §4-§5.
One readable file per idea:

``prompts``   the request/answer formats (§4; semantic vs non-semantic, §5.1) and Algorithm 1's
              one-request-per-keyframe loop;
``parsing``   answers back to vectors, never raising;
``data``      (request, answer) -> token ids with the loss on the answer only;
``lora``      the §5.2 adapter (r = 8, α = 32, every linear layer);
``generate``  plain greedy decoding and the grammar-constrained fast path;
``tiny``      the offline stand-in model (random weights, Qwen3 architecture, tokenizer trained here).

Nothing is imported or built at import time.
"""
