from typing_extensions import Buffer

class DecodeError(ValueError): ...

def rice_decode(
    unary: Buffer, params: Buffer, block_log2: int, remainders: Buffer, k: int, n: int, out: Buffer
) -> None: ...
def rice_patch(
    unary: Buffer,
    params: Buffer,
    block_log2: int,
    remainders: Buffer,
    k: int,
    n: int,
    target: Buffer,
    values: Buffer,
    width: int,
    shuffled: bool,
    add: bool,
) -> None: ...
def xor_scatter(target: Buffer, positions: Buffer, values: Buffer, width: int) -> None: ...
def add_scatter_f32(target: Buffer, positions: Buffer, deltas: Buffer, width: int) -> None: ...
