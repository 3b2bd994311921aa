"""Where the artifact's bytes go: one markdown table per tensor family (issue 13).

    python3 scripts/bytes_table.py final_model.ternary.ptz             # an artifact as train_gpt.py wrote it
    EXPORT_EMBED=int8 python3 scripts/bytes_table.py final_model.float.pt  # a CHECKPOINT_SAVE checkpoint, exported
                                                                       # here with the export knobs of the env
    options: --quality Q (brotli quality of the per-family columns, default 11), --packing P (checkpoint only:
    base3 / 2bit / rans; default: the one compress_model picks)

Per family (attention q/k/v/proj, MLP up/down, other ternary, the token embedding, the embedding projections,
other float matrices, small floats, ternary scales): format, tensors, parameters, bytes of the family alone through
brotli (rANS trits: their exact code length, which brotli does not shrink) and bits per parameter. For the trits,
the empirical entropies in bits per trit, each tensor with its own statistics: order 0; given the left neighbour in
the weight row, the one above in the column, both (the context model of TRIT_PACKERS["rans"]); per row (order 0 of
each row, plus log2(row length) bits per row for its statistics); given the group's zero count (two-part
code: the count's entropy + which positions are zero + the signs); against base-3 + brotli and rANS of the family
alone. The scales row gives bits per group scale (fp16 byte planes, or SCALE_FORMAT=log8's codes with their row
bases). The totals line compresses the whole payload as the export does.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

TERNARY_FAMILIES = {"q": "attn q", "k": "attn k", "v": "attn v", "proj": "attn proj", "up": "mlp up",
                    "down": "mlp down"}


def family(name, kind, shape):
    if name.startswith("blocks.") and name.split(".")[-2] in TERNARY_FAMILIES:  # ternary, or int with HYBRID_INT
        return TERNARY_FAMILIES[name.split(".")[-2]]
    if kind == "ternary":
        return "other ternary"
    if name == "tok_emb.weight":
        return "embed"
    if name in ("embed_in.weight", "embed_out.weight"):
        return "embed proj"
    return "other float matrices" if len(shape) == 2 and min(shape) >= tg.FLOAT_MATRIX_MIN else "small floats"


def entropy(counts):
    """Bits to code the samples counted in `counts` (..., symbols) with their own frequencies, summed."""
    counts = np.asarray(counts, np.float64)
    p = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    return float(-(counts[counts > 0] * np.log2(p[counts > 0])).sum())


def trit_entropies(w, group_size):
    """{measure: bits} of one 2-D trit tensor (values -1, 0, 1)."""
    d = w.astype(np.int64) + 1
    rows, cols = d.shape
    left = np.pad(d, ((0, 0), (1, 0)), constant_values=1)[:, :-1]
    above = np.pad(d, ((1, 0), (0, 0)), constant_values=1)[:-1]
    per_row = np.stack([(d == s).sum(1) for s in range(3)], 1)
    g = d.reshape(rows, cols // group_size, group_size)
    zeros = (g == 1).sum(-1).ravel()
    signs = np.bincount(d[d != 1].ravel(), minlength=3)[[0, 2]]
    group_bits = (entropy(np.bincount(zeros, minlength=group_size + 1))
                  + sum(math.lgamma(group_size + 1) - math.lgamma(z + 1) - math.lgamma(group_size - z + 1)
                        for z in zeros) / math.log(2) + entropy(signs))
    return {
        "H0": entropy(np.bincount(d.ravel(), minlength=3)),
        "H|left": entropy(np.bincount((3 * left + d).ravel(), minlength=9).reshape(3, 3)),
        "H|above": entropy(np.bincount((3 * above + d).ravel(), minlength=9).reshape(3, 3)),
        "H|left,above": entropy(np.bincount((9 * above + 3 * left + d).ravel(), minlength=27).reshape(9, 3)),
        "H|row": entropy(per_row) + rows * math.log2(cols),  # + the row's statistics, (3-1)/2 log2(cols) bits
        "H|group zeros": group_bits,
    }


def brotli_bytes(data, quality):
    import brotli

    return len(brotli.compress(data, quality=quality, lgwin=24)) if data else 0


def read_payload(path, args):
    """(payload, label) of an artifact, or of a checkpoint exported here with the env's export knobs."""
    import brotli
    import torch

    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK":  # torch.save writes a zip; anything else is taken for an artifact
        with open(path, "rb") as f:
            return brotli.decompress(f.read()), f"artifact {path}"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    env = {k: ("1" if v is True else "0" if v is False else str(v)) for k, v in ckpt["config"].items()}
    env.update({k: v for k, v in os.environ.items() if k.startswith("EXPORT_") or k == "BROTLI_QUALITY"})
    env.update(CHECKPOINT_PATH=str(path), DEVICE="cpu")
    h = tg.Hyperparameters(env)
    model = tg.GPT(h)
    tg.load_checkpoint(model, h, torch.device("cpu"), log=lambda s: None)
    if args.packing:
        return tg.serialize_model(model, h, args.packing), f"checkpoint {path} exported with {args.packing}"
    packing, _ = tg.compress_model(model, h, log=lambda s: None)
    return tg.serialize_model(model, h, packing), f"checkpoint {path} exported as compress_model picks ({packing})"


def family_rows(payload, quality):
    """{family: row dict} and the scale section's measures."""
    header, body = tg.read_header(payload)
    ternary = [t for t in header["tensors"] if t["kind"] == "ternary"]
    shapes = [tuple(t["shape"]) for t in ternary]
    (t_off, t_len), (s_off, s_len) = header["trits"], header["scales"]
    trits = tg.TRIT_PACKERS[header["trit_packing"]][1](payload[body + t_off : body + t_off + t_len], shapes)
    rows, at = {}, 0
    for t in header["tensors"]:
        fam = family(t["name"], t["kind"], t["shape"])
        row = rows.setdefault(fam, {"formats": set(), "tensors": 0, "params": 0, "data": [], "shapes": [],
                                    "trits": [], "H": {}})
        row["formats"].add(t["kind"])
        row["tensors"] += 1
        n = math.prod(t["shape"])
        row["params"] += n
        if t["kind"] == "ternary":
            w = trits[at : at + n].reshape(t["shape"])
            at += n
            row["trits"].append(w.reshape(-1))
            row["shapes"].append(tuple(t["shape"]))
            for k, v in trit_entropies(w, t["group_size"]).items():
                row["H"][k] = row["H"].get(k, 0.0) + v
        else:
            row["data"].append(payload[body + t["offset"] : body + t["offset"] + t["nbytes"]])
    for fam, row in rows.items():
        if row["trits"]:
            flat = np.concatenate(row["trits"])
            row["base3_bytes"] = brotli_bytes(tg.pack_trits_base3(flat), quality)
            row["rans_bytes"] = len(tg.pack_trits_rans(flat, row["shapes"]))
            row["bytes"] = row["rans_bytes"] if header["trit_packing"] == "rans" else row["base3_bytes"]
        else:
            row["bytes"] = brotli_bytes(b"".join(row["data"]), quality)
    section = payload[body + s_off : body + s_off + s_len]
    count = sum(math.prod(t["shape"]) // t["group_size"] for t in ternary)
    scale_row = {"count": count, "bytes": brotli_bytes(section, quality), "layout": header["scale_layout"]}
    if header["scale_layout"] == "planes":
        scale_row["other"] = f"interleaved fp16: {8 * brotli_bytes(tg.from_fp16_planes(section).tobytes(), quality) / max(count, 1):.3f}"
    else:  # log8: row bases, then one code per group
        codes = np.frombuffer(section[s_len - count :], np.uint8)
        scale_row["other"] = f"code entropy {entropy(np.bincount(codes)) / max(count, 1):.3f}"
    return header, rows, scale_row


def markdown(header, rows, scale_row, payload, label, quality):
    out = [f"Bytes of {label}: trit packing {header['trit_packing']}, brotli q{quality} per family.", "",
           "| family | format | tensors | params | bytes | bits/param | H0 | H\\|left | H\\|above | H\\|left,above | "
           "H\\|row | H\\|group zeros | base3+brotli | rANS |", "|" + "---|" * 14]
    total_params = 0
    for fam, row in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]):
        n = row["params"]
        total_params += n
        cells = [fam, "/".join(sorted(row["formats"])), str(row["tensors"]), f"{n:,}", f"{row['bytes']:,}",
                 f"{8 * row['bytes'] / n:.3f}"]
        if row["trits"]:
            cells += [f"{row['H'][k] / n:.4f}" for k in ("H0", "H|left", "H|above", "H|left,above", "H|row",
                                                          "H|group zeros")]
            cells += [f"{8 * row['base3_bytes'] / n:.4f}", f"{8 * row['rans_bytes'] / n:.4f}"]
        else:
            cells += [""] * 8
        out.append("| " + " | ".join(cells) + " |")
    s = scale_row
    out.append(f"| ternary scales | {s['layout']} | | {s['count']:,} | {s['bytes']:,} | "
               f"{8 * s['bytes'] / max(s['count'], 1):.3f} | | | | | | | {s['other']} | |")
    parts = sum(r["bytes"] for r in rows.values()) + s["bytes"]
    whole = brotli_bytes(payload, quality)
    out += ["", f"Sum of the families: {parts:,} B. Whole payload at q{quality} (what the export writes): "
                f"{whole:,} B for {total_params:,} parameters ({8 * whole / total_params:.3f} bits each)."]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--quality", type=int, default=11)
    ap.add_argument("--packing", choices=sorted(tg.TRIT_PACKERS))
    args = ap.parse_args()
    payload, label = read_payload(args.path, args)
    header, rows, scale_row = family_rows(payload, args.quality)
    print(markdown(header, rows, scale_row, payload, label, args.quality))


if __name__ == "__main__":
    main()
