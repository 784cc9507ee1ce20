"""The fine-tuning toolkit: datasets, `train`, `eval`, `adapters inspect` and the demo.

A client of the serving layers: it may import `loraserve.server`, `loraserve.client`,
`loraserve.adapters` and `loraserve.testing`; nothing in those imports it.
"""
