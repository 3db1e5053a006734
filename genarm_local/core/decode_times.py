"""When a scheduler step decodes its rows one at a time rather than in one batch: by measured times."""

from __future__ import annotations


class DecodeTimes:
    """Measured decode times of steps, by (rows, contexts decoded), and whether a step's rows go faster one at a time.

    llama.cpp's CPU output layer costs far more per row in a small batch than for a row alone: on Gemma-3-270M
    Q4_K_M (262k-token tied Q8_0 output matrix), one thread, a step of 1 sequence takes 11 ms, 2 sequences in one
    batch 38 ms (2 rows with only the last's logits: 16 ms), 4 sequences 56 ms, 8 sequences 70 ms. So 2-4 concurrent
    requests decode faster one row after the other, more of them in one batch, and where the crossover lies depends
    on the model, the threads and the hardware (a GPU batches everything better). The scheduler therefore times its
    own steps and decodes a step row by row only where the sum of the rows' measured single-row times is clearly
    below the measured time of a batch of that size (``margin``): it batches first (llama.cpp's way), tries one step
    row by row if the rows' single times are not known yet, then keeps to the faster, and re-times the batch now and
    then (``refresh``) in case the machine's load changed. One instance per Engine (``Engine.decode_times``), so
    every scheduler over it (the server's, each generate_batch call's) starts from what the others measured.

    A row's logits are not bit-identical whether it is decoded alone or in a batch (quantized matmuls round
    differently), so under concurrent load the mode is one more way a sequence's tokens depend on the others; a
    request alone always decodes its one row the same way."""

    def __init__(self, margin: float = 0.85, refresh: int = 64, smoothing: float = 0.25):
        self.margin, self.refresh, self.smoothing = margin, refresh, smoothing
        self._seconds: dict[tuple[int, tuple[int, ...]], float] = {}
        self._since_batched: dict[tuple[int, tuple[int, ...]], int] = {}

    def record(self, key: tuple[int, tuple[int, ...]], seconds: float) -> None:
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else old + self.smoothing * (seconds - old)

    def seconds(self, key: tuple[int, tuple[int, ...]]) -> float | None:
        return self._seconds.get(key)

    def faster_one_at_a_time(
        self, singles: list[tuple[int, tuple[int, ...]]], batched: tuple[int, tuple[int, ...]]
    ) -> bool:
        times = [self._seconds.get(key) for key in singles]
        batch = self._seconds.get(batched)
        if batch is None:  # batch first, as llama.cpp does
            return False
        if None in times:  # then one step row by row, to time the rows alone
            return True
        if sum(times) >= self.margin * batch:
            return False
        waited = self._since_batched.get(batched, 0) + 1
        if waited >= self.refresh:  # every refresh-th such step is batched again, to re-time the batch
            self._since_batched[batched] = 0
            return False
        self._since_batched[batched] = waited
        return True
