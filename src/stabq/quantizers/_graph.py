"""What a custom autograd Function's backward may know about the graph it runs in."""

from __future__ import annotations

import torch

# Inside a backward: will the graph (and what it saved) be used again? True under
# retain_graph or create_graph; where torch lacks this private probe, assume it will.
graph_kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)
