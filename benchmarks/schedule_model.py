"""A model of the forward prefill's work on the H100 (issue 13), to predict what persistent Gluon programs gain over a
program per query tile before a GPU times them (benchmarks/NOTES.md, "Persistent Gluon programs").

Each 128-row query tile costs C0 (launch, prologue, ring fill, epilogue: per tile) plus CK per 128-key tile (D = 128);
C0 = 10 us and CK = 1.87 us fit the session-8 Gluon rows (dense 371 / 511 / 578 TFLOP/s at S = 1k / 4k / 16k, a
program per tile). One-tile programs are dealt to the 132 SMs in launch order as they free up (the hardware's
dispatch, query tiles reversed within a head); persistent programs take the work units of gluon.py.j2's unit_coords
in turn (pairs of query tiles k, m_tiles - 1 - k of a head, in L2 sections of heads), at a per-tile cost c0 that the
GPU run measures; "strided" deals single tiles, longest first within a section, the schedule pairs replaced.

    python3 benchmarks/schedule_model.py"""
import heapq

SMS, CK, C0 = 132, 1.87e-6, 10e-6
BLOCK, L2_KV_BYTES = 128, 4 << 20  # as gluon.py.j2


def tile_keys(m: int, m_tiles: int, causal: bool) -> int:
    return m + 1 if causal else m_tiles


def one_tile(S: int, heads: int, causal: bool) -> float:
    """Makespan of a program per query tile, dispatched in launch order to the first free SM."""
    m_tiles, sms = S // BLOCK, [0.0] * SMS
    for _ in range(heads):
        for m in reversed(range(m_tiles)):
            heapq.heappush(sms, heapq.heappop(sms) + C0 + CK * tile_keys(m, m_tiles, causal))
    return max(sms)


def units(S: int, heads: int, causal: bool, paired: bool, D: int = 128) -> list[list[int]]:
    """Each work unit's tiles as key-tile counts, in unit_coords' order (paired) or as single tiles (strided)."""
    m_tiles = S // BLOCK
    per_head = (m_tiles + 1) // 2 if paired else m_tiles
    section = min(max(L2_KV_BYTES // (S * 2 * D * 2), 1), heads)
    out = []
    for u in range(per_head * heads):
        first = u // (section * per_head) * section
        k = (u - first * per_head) // min(section, heads - first)
        ms = ([m_tiles - 1 - k] + ([k] if 2 * k + 1 != m_tiles else [])) if paired else [m_tiles - 1 - k]
        out.append([tile_keys(m, m_tiles, causal) for m in ms])
    return out


def persistent(S: int, heads: int, causal: bool, c0: float, paired: bool = True) -> float:
    """Makespan of persistent programs: program p runs units p, p + programs, ..."""
    work = units(S, heads, causal, paired)
    programs = min(SMS, len(work))
    return max(sum(c0 + CK * n for unit in work[p::programs] for n in unit) for p in range(programs))


def main() -> None:
    print("TFLOP/s of bench's rows (16 heads, 16k tokens, D = 128) by the model; persistent at c0 = 2 / 3 / 5 us")
    for causal in (False, True):
        for S in (1024, 4096, 16384):
            heads = 16384 // S * 16
            flops = 4 * 128 * heads * (S * (S + 1) / 2 if causal else S * S)
            rate = lambda t: f"{flops / t / 1e12:4.0f}"
            pairs = " / ".join(rate(persistent(S, heads, causal, c0)) for c0 in (2e-6, 3e-6, 5e-6))
            strided = rate(persistent(S, heads, causal, 3e-6, paired=False))
            print(f"{'causal' if causal else 'dense'} S={S}: one-tile {rate(one_tile(S, heads, causal))}, "
                  f"persistent pairs {pairs}, strided tiles (c0 = 3 us) {strided}")


if __name__ == "__main__":
    main()
