"""Host-side bookkeeping of the paged KV cache: which blocks are free."""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Pop from the end: low block ids are handed out first, which keeps the
        # gathered working set of a small batch compact.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - count :][::-1]
        del self._free[len(self._free) - count :]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) > self.num_blocks:
            raise RuntimeError("KV blocks freed twice")


def kv_block_count(num_kv_blocks: int | None, *, max_model_len: int, block_size: int, max_num_seqs: int,
                   kv_cache_bytes: int, bytes_per_token: int) -> int:
    """The KV cache's block count: `num_kv_blocks` if given, else enough for
    `max_num_seqs` full-length sequences within `kv_cache_bytes` (at least one
    sequence); ValueError if it cannot hold one sequence of `max_model_len`."""
    blocks_per_seq = -(-max_model_len // block_size)
    if num_kv_blocks is None:
        block_bytes = block_size * bytes_per_token
        num_kv_blocks = max(blocks_per_seq, min(max_num_seqs * blocks_per_seq, kv_cache_bytes // block_bytes))
    if num_kv_blocks < blocks_per_seq:
        raise ValueError(
            f"num_kv_blocks={num_kv_blocks} cannot hold one sequence of max_model_len="
            f"{max_model_len} ({blocks_per_seq} blocks of {block_size})"
        )
    return num_kv_blocks
