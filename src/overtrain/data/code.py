"""Python source mixed into pre-training text, so that pre-training can teach code habits.

Whole standard-library modules, docstrings and comments kept, from the code tasks'
training modules only (`tasks.code_modules`): a held-out module never enters
pre-training, so the code tasks' held-out loss and the docstring probe's prompts stay
unseen. Modules are taken in a seeded order until they make up `fraction` of the
training characters, then shuffled in among the prose documents.
"""

from __future__ import annotations

import random

from overtrain.data.tasks import code_modules, stdlib_sources


def mix_in_code(prose: list[str], fraction: float, seed: int) -> list[str]:
    """`prose` plus code modules making up `fraction` of the characters of the result."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.code_fraction={fraction}: must be in [0, 1)")
    sources = stdlib_sources()
    modules, _ = code_modules(seed)
    random.Random(seed).shuffle(modules)
    wanted = fraction / (1 - fraction) * sum(map(len, prose))
    code, chars = [], 0
    for module in modules:
        if chars >= wanted:
            break
        code.append(sources[module])
        chars += len(sources[module])
    if chars < wanted:
        raise ValueError(f"data.code_fraction={fraction}: the code tasks' training modules hold {chars:,} characters, "
                         f"{wanted:,.0f} are needed; lower it")
    documents = prose + code
    random.Random(seed + 1).shuffle(documents)
    return documents
