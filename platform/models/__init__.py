"""models: everything that touches a Med-VLM's weights. Loading and checking model folders, the chat prompt,
the toy Med-VLM, shared-prefix log-probs, answering questions (one process or a Ray actor), and engines/ (the
decoding interface with its transformers and vLLM implementations).

May import: core/, data/ (and hscr). Never a stage.
"""
