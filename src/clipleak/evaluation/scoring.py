"""Score a reconstruction against the client's ground truth and two honest baselines.

The baselines need no gradient at all:

* ``blank``: an all-black image;
* ``prototype``: the mean public image of the class the attacker has (or inferred) for each slot.

An attack that does not beat the class prototype has not shown that the shared update leaks more
about the client's images than the public data already tells about their classes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ClipleakError
from ..records import Reconstruction, Truth
from .metrics import (
    LabelledImages,
    finite_or_none,
    label_accuracy,
    label_count_accuracy,
    lpips_distance,
    lpips_status,
    pair_by_psnr,
    psnr,
    reid_rate,
    ssim,
)
from .stats import Interval, at_chance, bootstrap_mean, rate_interval

METHODS = ("attack", "blank", "prototype")
METHOD_LABELS = {
    "attack": "attack reconstruction",
    "blank": "blank image (baseline)",
    "prototype": "class prototype (baseline)",
    "public-nn": "public nearest neighbour in feature space (baseline)",
}
REID_METHODS = ("attack", "prototype")


def _floats(t: torch.Tensor | None) -> list[float | None] | None:
    return None if t is None else [finite_or_none(v) for v in t.reshape(-1).tolist()]


def _mean(t: torch.Tensor | None) -> float | None:
    return None if t is None else finite_or_none(t.double().mean())


def _fmt_pair(a: float, b: float, start: int = 1) -> tuple[str, str]:
    """Format two values with enough digits (from ``start``) that different numbers never print the same."""
    for digits in range(start, start + 4):
        sa, sb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if sa != sb or a == b:
            return sa, sb
    return f"{a:.6g}", f"{b:.6g}"


def verdict(attack_db: float, blank_db: float, prototype_db: float) -> dict[str, Any]:
    """Plain-words verdict from mean PSNRs; the attack beats a baseline only when strictly higher."""
    beat_blank = attack_db > blank_db
    beat_proto = attack_db > prototype_db
    a_p, p_s = _fmt_pair(attack_db, prototype_db)
    a_b, b_s = _fmt_pair(attack_db, blank_db)
    if beat_blank and beat_proto:
        a_s = a_p if len(a_p) >= len(a_b) else a_b
        text = (f"The attack beat both baselines: {a_s} dB PSNR vs {p_s} dB for the class prototype "
                f"and {b_s} dB for a blank image.")
    elif beat_blank:
        text = (f"The attack did NOT beat the class prototype ({a_p} dB vs {p_s} dB): the reconstruction "
                f"carries less about these images than the mean public image of the class. It did beat a "
                f"blank image ({a_b} dB vs {b_s} dB).")
    elif beat_proto:
        text = (f"The attack did NOT beat a blank image ({a_b} dB vs {b_s} dB), although it beat the class "
                f"prototype ({a_p} dB vs {p_s} dB): an all-black image is closer to these images than the "
                f"reconstruction.")
    else:
        text = (f"The attack did NOT beat either baseline: {a_p} dB PSNR vs {p_s} dB for the class "
                f"prototype and {b_s} dB for a blank image. The reconstruction carries less about these "
                f"images than the mean public image of the class, or even an all-black image.")
    return {"beat_blank": bool(beat_blank), "beat_prototype": bool(beat_proto), "text": text}


BASELINE_NAMES = {"prototype": "the class prototype", "blank": "a blank image",
                  "public-nn": "the public nearest neighbour"}


def losses_to_baselines(methods: dict[str, Any], reid: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every (baseline, measure) on which the attack does not come out strictly ahead: PSNR, SSIM and
    re-identification, against every baseline that was scored (blank, prototype and the extra ones)."""
    lost: list[dict[str, Any]] = []
    measures = [("PSNR", "dB", lambda m: methods[m]["psnr_mean"]), ("SSIM", "", lambda m: methods[m]["ssim_mean"])]
    if reid is not None and reid.get("attack") is not None:
        measures.append(("re-identification", "%", lambda m: reid.get(m)))
    for name, unit, get in measures:
        a = get("attack")
        for m in methods:
            b = get(m) if m != "attack" else None
            if b is None or a is None or a > b:
                continue
            lost.append({"baseline": m, "measure": name, "attack": float(a), "baseline_value": float(b),
                         "unit": unit, "tie": bool(a == b)})
    return lost


def _losses_text(lost: list[dict[str, Any]]) -> str:
    """Sentences naming every baseline the attack did not beat (or only tied), beyond the PSNR verdict's
    own two, grouped by baseline: "It did NOT beat the public nearest neighbour on PSNR (a vs b) and
    SSIM (a vs b)."""
    extra = [x for x in lost if not (x["measure"] == "PSNR" and x["baseline"] in ("blank", "prototype"))]
    groups: dict[bool, dict[str, list[str]]] = {False: {}, True: {}}
    for x in extra:
        if x["unit"] == "%":
            a, b = f"{x['attack']:.0%}", f"{x['baseline_value']:.0%}"
        elif x["unit"] == "dB":
            a, b = _fmt_pair(x["attack"], x["baseline_value"])
            a, b = f"{a} dB", f"{b} dB"
        else:
            a, b = _fmt_pair(x["attack"], x["baseline_value"], start=2)
        item = f"{x['measure']} (both {a})" if x["tie"] else f"{x['measure']} ({a} vs {b})"
        groups[x["tie"]].setdefault(x["baseline"], []).append(item)

    def clause(baseline: str, items: list[str]) -> str:
        who = BASELINE_NAMES.get(baseline, f"the {baseline} baseline")
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return f"{who} on {listed}"

    text = ""
    for tie, lead in ((False, " It did NOT beat "), (True, " It only tied ")):
        if groups[tie]:
            text += lead + "; ".join(clause(b, items) for b, items in groups[tie].items()) + "."
    return text


def _score(images: torch.Tensor, truth: torch.Tensor, use_lpips: bool) -> dict[str, Any]:
    p = psnr(images, truth)
    s = ssim(images, truth)
    lp = lpips_distance(images, truth) if use_lpips else None
    out: dict[str, Any] = {
        "psnr": _floats(p), "ssim": _floats(s), "lpips": _floats(lp),
        "psnr_mean": _mean(p), "ssim_mean": _mean(s), "lpips_mean": _mean(lp),
    }
    for name, values in (("psnr", out["psnr"]), ("ssim", out["ssim"])):
        finite = [v for v in values if v is not None]
        out[f"{name}_interval"] = bootstrap_mean(finite).to_dict() if finite else None
    return out


def evaluate(
    recon: Reconstruction,
    truth: Truth,
    prototypes: torch.Tensor,
    *,
    with_lpips: bool = True,
    reid_pool: LabelledImages | None = None,
    reid_k: int = 10,
    reid_draws: int = 20,
    reid_seed: int = 0,
    extra_baselines: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Score ``recon`` against ``truth`` next to the blank and class-prototype baselines.

    Args:
        recon: the attack's output (images ``(B, 3, H, W)`` and the labels it used or inferred).
        truth: the client's true batch.
        prototypes: ``(K, 3, H, W)`` mean public image per class (``ImageSet.prototypes()``).
        with_lpips: compute LPIPS when its weights are on disk (never downloads).
        reid_pool: labelled images (e.g. the private split) to draw re-identification distractors
            from; None skips re-identification.
        reid_k: candidates per re-identification trial (chance is ``1 / reid_k``).
        reid_draws: trials per image; ``reid_seed`` seeds the draws (same candidates for every method).
        extra_baselines: more attacker-side baselines, name -> images in the *reconstruction's* order
            (e.g. ``"public-nn"``: the public image nearest in the target's feature space); they are
            paired like the reconstruction and scored (and re-identified) beside it.

    Returns:
        A JSON-serialisable dict (``report.write_report`` shows it)::

            batch_size, image_size [H, W], attack, label_source,
            pairing             perm: recon[pairing[i]] is scored against truth[i]
            labels              {"true": [...], "reconstructed": [...] (paired order)}
            label_accuracy      float (after pairing)
            label_count_accuracy  float, order-free (multiset overlap / B), unaffected by pairing
            label_count_interval  its 95% Wilson interval over the B images {value, low, high, n}
            methods             {"attack"|"blank"|"prototype": {psnr, ssim, lpips: per-image lists
                                 (lpips None when unavailable), psnr_mean, ssim_mean, lpips_mean,
                                 psnr_interval, ssim_interval: 95% bootstrap over the images}}
            lpips               {"available": bool, "note": str}
            reidentification    None, or {"k", "draws", "seed", "chance", "attack", "prototype", "note",
                                "interval": {method: 95% Wilson interval over the B images}}
                                (rates None and the reason in "note" when the pool is too small)
            verdict             {"beat_blank", "beat_prototype", "text"}
    """
    r_img, t_img, r_lab, t_lab, protos = _checked_inputs(recon, truth, prototypes)
    b = t_img.shape[0]
    perm = pair_by_psnr(r_img, t_img)
    r_img, r_lab = r_img[perm], r_lab[perm]
    images = {
        "attack": r_img,
        "blank": torch.zeros_like(t_img),
        "prototype": protos[r_lab],
    }
    for name, imgs in (extra_baselines or {}).items():
        if imgs.shape != t_img.shape:
            raise ClipleakError(f"baseline {name!r} has shape {tuple(imgs.shape)}, expected {tuple(t_img.shape)}")
        images[name] = imgs.detach().cpu().float()[perm]

    lp_ok, lp_note = lpips_status()
    if not with_lpips:
        lp_ok, lp_note = False, "LPIPS not computed (disabled for this evaluation)"
    methods = {m: _score(images[m], t_img, lp_ok) for m in images}
    reid = None if reid_pool is None else _reidentification(
        {m: images[m] for m in (*REID_METHODS, *(extra_baselines or {}))}, t_img, t_lab, reid_pool,
        k=reid_k, draws=reid_draws, seed=reid_seed)

    means = {m: methods[m]["psnr_mean"] for m in METHODS}
    if any(v is None for v in means.values()):
        raise ClipleakError("PSNR is not finite (the images contain NaN); cannot give a verdict")
    return {
        "batch_size": int(b),
        "image_size": [int(t_img.shape[-2]), int(t_img.shape[-1])],
        "attack": str(recon.attack),
        "label_source": str(recon.label_source),
        "pairing": [int(i) for i in perm.tolist()],
        "labels": {"true": [int(i) for i in t_lab.tolist()],
                   "reconstructed": [int(i) for i in r_lab.tolist()]},
        "label_accuracy": label_accuracy(r_lab, t_lab),
        "label_count_accuracy": label_count_accuracy(r_lab, t_lab),
        "label_count_interval": rate_interval(label_count_accuracy(r_lab, t_lab), b).to_dict(),
        "methods": methods,
        "lpips": {"available": bool(lp_ok), "note": lp_note},
        "reidentification": reid,
        "verdict": _full_verdict(means, methods, reid),
    }


def _full_verdict(means: dict[str, float], methods: dict[str, Any], reid: dict[str, Any] | None) -> dict[str, Any]:
    v = verdict(means["attack"], means["blank"], means["prototype"])
    lost = losses_to_baselines(methods, reid)
    v["lost_to"] = lost
    v["text"] += _losses_text(lost)
    if reid is not None and reid.get("attack") is not None:
        iv = Interval(**reid["interval"]["attack"])
        chance = float(reid["chance"])
        v["reid_at_chance"] = at_chance(iv, chance)
        v["text"] += (f" Re-identification {iv.pct()}: " + (
            f"at chance (its 95% interval reaches chance, {chance:.0%})." if v["reid_at_chance"] else
            f"above chance (its 95% interval excludes chance, {chance:.0%})."))
    return v


def _checked_inputs(recon: Reconstruction, truth: Truth, prototypes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and prototypes on the CPU, with one line for anything that does not fit together."""
    r_img, t_img = recon.images.detach().cpu().float(), truth.images.detach().cpu().float()
    if r_img.shape != t_img.shape:
        raise ClipleakError(
            f"reconstruction {tuple(r_img.shape)} and ground truth {tuple(t_img.shape)} differ in shape"
        )
    b = t_img.shape[0]
    r_lab = torch.as_tensor(recon.labels).reshape(-1).long().cpu()
    t_lab = torch.as_tensor(truth.labels).reshape(-1).long().cpu()
    if r_lab.numel() != b or t_lab.numel() != b:
        raise ClipleakError(f"need one label per image: {b} images, {r_lab.numel()} reconstructed labels, "
                            f"{t_lab.numel()} true labels")
    protos = prototypes.detach().cpu().float()
    if protos.dim() != 4 or protos.shape[1:] != t_img.shape[1:]:
        raise ClipleakError(f"prototypes {tuple(protos.shape)} do not match images {tuple(t_img.shape)}")
    if int(r_lab.min()) < 0 or int(r_lab.max()) >= protos.shape[0]:
        raise ClipleakError(f"reconstructed labels must be in [0, {protos.shape[0] - 1}]")
    return r_img, t_img, r_lab, t_lab, protos


def _reidentification(images: dict[str, torch.Tensor], truth: torch.Tensor, labels: torch.Tensor,
                      pool: LabelledImages, *, k: int, draws: int, seed: int) -> dict[str, Any]:
    """One-to-one re-identification of every method's images, each rate with its interval over the images
    (the rates None and the reason in ``note`` when the pool is too small)."""
    b = truth.shape[0]
    reid: dict[str, Any] = {"k": int(k), "draws": int(draws), "seed": int(seed), "chance": 1.0 / int(k), "note": ""}
    try:
        for m, imgs in images.items():
            reid[m] = reid_rate(imgs, truth, labels, pool, k=k, draws=draws, seed=seed)
    except ClipleakError as e:
        reid.update({m: None for m in images})
        reid["note"] = f"re-identification not computed: {e}"
        return reid
    reid["interval"] = {m: rate_interval(reid[m], b).to_dict() for m in images}
    reid["note"] = (f"share of {b * draws} trials in which the image picks the client's true image out of {k} "
                    f"same-class candidates by PSNR (chance {1 / k:.0%})")
    return reid
