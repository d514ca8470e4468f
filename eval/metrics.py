"""Benchmark metrics, each a pure function: boxes, captions, VQA, OCR and multiple choice.

Every metric takes plain Python values (strings, lists of 4 floats) so it can be unit-tested against
hand-computed cases and wrapped by `evaluate` modules (eval/evaluate_metrics/) or lmms-eval tasks.
Box convention: [x1, y1, x2, y2] floats in original-image pixels. A prediction that is missing,
unparseable, non-finite or inverted is a *miss*: it scores 0 and is counted in ``invalid``.
"""
import re
import shutil
import string
from collections import Counter, defaultdict

# A valid box: 4 finite numbers with x2 > x1 and y2 > y1, no image bounds (box_utils_granvit.py has the rules).
from granvit.box_utils_granvit import box_iou
from granvit.box_utils_granvit import is_valid_box as valid_box

# ----------------------------------------------------------------------------- boxes


def grounding_scores(predictions, references, thresholds=(0.5,)):
    """ACC@IoU for each threshold, ACC@[0.5:0.95] sweep, mean IoU, and the number of invalid predictions.

    predictions: per sample a box, or None / [] / anything invalid (a miss, IoU 0).
    references: per sample a valid box (an invalid reference is a data error and raises).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("grounding_scores needs at least one sample")
    ious, invalid = [], 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not valid_box(ref):
            raise ValueError(f"reference box {ref!r} of sample {i} is not a valid [x1, y1, x2, y2] box")
        if valid_box(pred):
            ious.append(box_iou([float(v) for v in pred], [float(v) for v in ref]))
        else:
            ious.append(0.0)
            invalid += 1
    n = len(ious)
    out = {f"acc@{t:g}": sum(iou >= t for iou in ious) / n for t in thresholds}
    # COCO-style sweep 0.50, 0.55, ..., 0.95 (round() keeps 0.7 from becoming 0.7000000000000001).
    sweep = [round(0.5 + 0.05 * k, 2) for k in range(10)]
    out["acc@0.5:0.95"] = sum(sum(iou >= t for iou in ious) / n for t in sweep) / len(sweep)
    out["miou"] = sum(ious) / n
    out["invalid"] = invalid
    out["count"] = n
    return out


def auroc(scores, labels):
    """Area under the ROC curve of ``scores`` for telling positives (``labels`` true) from negatives: the probability
    that a random positive scores above a random negative, ties counting half (the Mann-Whitney U statistic, as
    sklearn's ``roc_auc_score``). None unless both classes occur."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    positives = sum(bool(label) for label in labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks, start = [0.0] * len(scores), 0
    while start < len(order):  # 1-based ranks, tied scores sharing their mean rank
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# ----------------------------------------------------------------------------- text normalisation

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(text: str) -> str:
    """Lowercase, punctuation -> space, collapse whitespace (used for exact match)."""
    return " ".join(str(text).lower().translate(_PUNCT_TABLE).split())


def exact_match(predictions, references) -> float:
    """Share of predictions equal to their reference after `normalize_text`."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} / {len(references)}")
    return sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references)) / len(references)


# ----------------------------------------------------------------------------- captions (pycocoevalcap)


def caption_scores(predictions, references, meteor=None):
    """Corpus BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap) and METEOR when Java exists.

    references: per sample a string or a list of reference strings. Text is tokenised with the
    COCO PTBTokenizer when Java is available (as the COCO caption server does), otherwise with
    `normalize_text`; the tokenizer used is returned under "tokenizer" because scores differ slightly.
    CIDEr-D's IDF comes from the references of this set, so it is unstable on tiny sets.
    meteor: None = only if `java` is on PATH; True = require it (RuntimeError without Java).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} / {len(references)}")
    have_java = shutil.which("java") is not None
    gts = {i: [r] if isinstance(r, str) else list(r) for i, r in enumerate(references)}
    res = {i: [p if p else ""] for i, p in enumerate(predictions)}
    if have_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in cs] for i, cs in gts.items()})
        res = tok.tokenize({i: [{"caption": c} for c in cs] for i, cs in res.items()})
    else:
        gts = {i: [normalize_text(c) for c in cs] for i, cs in gts.items()}
        res = {i: [normalize_text(c) for c in cs] for i, cs in res.items()}
    # pycocoevalcap asserts on empty hypotheses; an empty prediction scores as a single unknown token.
    res = {i: [c if c.strip() else "<empty>" for c in cs] for i, cs in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{k + 1}": float(b) for k, b in enumerate(bleu)}
    out["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["tokenizer"] = "ptb" if have_java else "normalize_text"
    out["count"] = len(references)
    if meteor is True and not have_java:
        raise RuntimeError("METEOR needs Java (the meteor-1.5.jar bundled with pycocoevalcap); `java` is not on PATH")
    if (meteor is None and have_java) or meteor is True:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    else:
        out["meteor_skipped"] = "no java on PATH" if not have_java else "disabled"
    return out


# ----------------------------------------------------------------------------- VQA accuracy
# Normalisation of the official VQA evaluation (github.com/GT-Vision-Lab/VQA vqaEval.py, as used by
# the EvalAI server and lmms-eval): punctuation, number words -> digits, articles, contractions.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)" (a typo for a look-behind): it strips every period not
# followed by a digit, so "2.5" survives but "5." -> "5". Kept as-is to reproduce official scores.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation (processPunctuation + processDigitArticle)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        # Official rule: drop the mark when it touches a space or the text has a "1,000"-style number,
        # otherwise replace it by a space ("yes/no" -> "yes no").
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers.

    min(#humans that said it / 3, 1), averaged over the leave-one-annotator-out subsets as the
    official script does; e.g. 2 matches out of 10 -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
    Prediction and answers both go through `vqa_normalize` (EvalAI normalises answers server-side).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- OCR-style QA


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_detection_scores(predictions, references, iou_threshold: float = 0.5) -> dict:
    """Text-region detection + recognition over images: precision / recall at an IoU threshold, text exact match and
    character error rate on the matched pairs.

    predictions, references: per image a list of (xyxy box, text). Within an image, pairs are matched one-to-one,
    greedily by decreasing IoU, and a pair with IoU >= `iou_threshold` is a hit (the ICDAR 2015 IoU protocol).
    exact = matched pairs whose texts are identical / matched pairs; cer = summed edit distance / summed reference
    characters over matched pairs (recognition quality where detection succeeded; misses show in recall).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} images of predictions for {len(references)} of references")
    num_pred = num_ref = matched = exact = edits = chars = 0
    for preds, refs in zip(predictions, references):
        num_pred, num_ref = num_pred + len(preds), num_ref + len(refs)
        pairs = sorted(
            ((box_iou(p[0], r[0]), i, j) for i, p in enumerate(preds) for j, r in enumerate(refs)), reverse=True
        )
        used_p, used_r = set(), set()
        for iou, i, j in pairs:
            if iou < iou_threshold:
                break
            if i in used_p or j in used_r:
                continue
            used_p.add(i)
            used_r.add(j)
            pred_text, ref_text = preds[i][1], refs[j][1]
            matched += 1
            exact += pred_text == ref_text
            edits += _levenshtein(pred_text, ref_text)
            chars += len(ref_text)
    return {
        "precision": matched / num_pred if num_pred else 0.0,
        "recall": matched / num_ref if num_ref else 0.0,
        "exact": exact / matched if matched else 0.0,
        "cer": edits / chars if chars else 0.0,
        "num_pred": num_pred,
        "num_ref": num_ref,
        "matched": matched,
    }


def anls(prediction: str, answers, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (DocVQA / InfoVQA, Biten et al. 2019).

    max over answers of 1 - NL, where NL = edit distance / max length on lowercased, whitespace-collapsed
    strings, and a similarity is zeroed when NL >= threshold.
    """
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for ans in answers:
        gt = " ".join(str(ans).strip().lower().split())
        longest = max(len(pred), len(gt))
        nl = _levenshtein(pred, gt) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str):
    text = str(text).strip()
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022; pix2struct's relaxed_correctness).

    Numbers are correct within `tolerance` relative error ("45%" reads as 0.45); anything else,
    and a target of exactly 0 (no relative error exists), needs a case-insensitive exact match.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = str(prediction).strip()
    for target in answers:
        target = str(target).strip()
        p, t = _to_float(pred), _to_float(target)
        if p is not None and t:
            if abs(p - t) / abs(t) <= tolerance:
                return 1.0
        elif pred.lower() == target.lower():
            return 1.0
    return 0.0


def ocrbench_score(prediction: str, answers, dataset_name: str = "") -> float:
    """OCRBench's rule (github.com/Yuliang-Liu/MultimodalOCR): 1 if any answer is a substring of the prediction.

    Text is lowercased and newlines become spaces; for HME100k (handwritten formulas) all spaces are
    removed and case is kept, as in the OCRBench scorer.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = str(prediction)
    for ans in answers:
        if dataset_name == "HME100k":
            a = str(ans).strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = str(ans).lower().strip().replace("\n", " ")
            p = pred.lower().strip().replace("\n", " ")
        if a in p:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------- multiple choice, yes/no

_MC_PREFIXES = ("the best answer is", "the correct answer is", "the answer is", "best answer:", "answer:",
                "the best option is", "the correct option is", "best option:", "option")


def extract_choice(prediction: str, options: dict):
    """The option letter a free-form answer picks, or None (a miss).

    options: {"A": "red", "B": "blue", ...}. VLMEvalKit's rule-based matcher: strip answer phrases and
    brackets, then (1) exactly one option letter appears as a standalone token -> it; (2) otherwise
    exactly one option text appears in the answer -> its letter. Ambiguous answers ("A or B") are misses.
    """
    text = str(prediction).strip()
    low = text.lower()
    for prefix in _MC_PREFIXES:
        if low.startswith(prefix):
            text = text[len(prefix):]
            break
    tokens = text.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}\"'"})).split()
    letters = {t for t in tokens if t in options}
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None
    low = normalize_text(text)
    hits = [k for k, v in options.items() if normalize_text(v) and f" {normalize_text(v)} " in f" {low} "]
    return hits[0] if len(hits) == 1 else None


def choice_accuracy(predictions, options_list, answers):
    """Multiple-choice accuracy with letter extraction; returns accuracy, unparsed count and picks."""
    if not (len(predictions) == len(options_list) == len(answers)) or not answers:
        raise ValueError("predictions, options_list and answers must be non-empty and equally long")
    picks = [extract_choice(p, o) for p, o in zip(predictions, options_list)]
    correct = [pk == a for pk, a in zip(picks, answers)]
    return {"accuracy": sum(correct) / len(correct), "unparsed": sum(p is None for p in picks),
            "count": len(correct), "picks": picks}


def group_accuracy(group_ids, correct) -> float:
    """Share of groups whose samples are all correct (MMBench circular eval; HallusionBench fAcc/qAcc)."""
    if len(group_ids) != len(correct) or not correct:
        raise ValueError("group_ids and correct must be non-empty and equally long")
    groups = defaultdict(list)
    for g, c in zip(group_ids, correct):
        groups[g].append(bool(c))
    return sum(all(v) for v in groups.values()) / len(groups)


def extract_yes_no(prediction: str):
    """'yes' / 'no' from a free-form answer (first word wins, else the only one present), or None."""
    words = normalize_text(prediction).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    present = {w for w in words if w in ("yes", "no")}
    return present.pop() if len(present) == 1 else None


def yes_no_accuracy(predictions, answers):
    """HallusionBench-style yes/no accuracy; answers are 'yes'/'no' (or HallusionBench's '1'/'0')."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError("predictions and answers must be non-empty and equally long")
    gold = [{"1": "yes", "0": "no"}.get(str(a).strip().lower(), str(a).strip().lower()) for a in answers]
    picks = [extract_yes_no(p) for p in predictions]
    correct = [p == g for p, g in zip(picks, gold)]
    return {"accuracy": sum(correct) / len(correct), "unparsed": sum(p is None for p in picks),
            "count": len(correct), "correct": correct}


def most_common(items):
    """The most frequent item (first seen wins ties): the majority baseline for captions."""
    return Counter(items).most_common(1)[0][0]
