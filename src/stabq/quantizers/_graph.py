"""What stabq's custom autograd Functions may know about the graph they run in."""

from __future__ import annotations

import torch

# Inside a backward: will the graph (and what it saved) be used again? True under
# retain_graph or create_graph; where torch lacks this private probe, assume it will.
graph_kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)

# Is torch.compile tracing this call? The fast eager Functions' in-place tricks stay out of
# compiled graphs (older torch has only torch._dynamo.is_compiling).
compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
