"""
Text for the U-Net to follow: a word tokenizer built from the training captions (its vocabulary is kept in
the model's config), a small transformer that turns a caption into one vector per token, trained with the
U-Net from scratch (latent diffusion's own text model, [LDM]'s BERTEmbedder, was trained so: nothing here is
pretrained), and the captions of CelebA, which has none: sentences made from each face's 40 attributes, a new
one each time a face is drawn (as MM-CelebA-HQ made its text from the attribute table). Last, DreamBooth: a
new word for one person, taught to a trained text model from a few photos.

    tokens = Tokenizer(vocab).batch(["a smiling woman with glasses"], 32)   # (1, 32) ids, 0 = padding
    context, mask = TextEncoder(len(vocab), 256, 3)(tokens)                  # (1, 32, 256), (1, 32)

A caption is [BOS] its words [EOS]: the empty caption (the unconditional model of classifier-free guidance)
is [BOS, EOS], never nothing, so that attention always has a key to attend to.

References:
  [CFG]  Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598
  [LDM]  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752
  [TF]   Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762
  [DB]   Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
         Generation", arXiv:2208.12242
"""
import functools
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, Denoising, guided

PAD, BOS, EOS = 0, 1, 2  # the special tokens' ids
SPECIAL = ("<pad>", "<bos>", "<eos>")
MAX_TOKENS = 64  # tokens of a caption, BOS and EOS included (a CelebA caption of every attribute has ~110)

# -----------------------------------------------------------------------------
# the tokenizer: words, the vocabulary of the training captions


def words(caption):
    """A caption's words: lower-cased, split at everything but letters, digits and apostrophes."""
    return re.findall(r"[a-z0-9']+", caption.lower())


class Tokenizer:
    """Words to ids and back. The vocabulary is the special tokens, then the training captions' words."""

    def __init__(self, vocab):
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def build(captions):
        """The vocabulary of `captions` (every word once, sorted)."""
        return Tokenizer(SPECIAL + tuple(sorted({w for c in captions for w in words(c)})))

    def encode(self, caption, max_tokens=MAX_TOKENS):
        """-> (ids: [BOS] the known words [EOS], at most max_tokens; the unknown words; whether it was
        cut)."""
        known = [self.ids[w] for w in words(caption) if w in self.ids]
        unknown = [w for w in words(caption) if w not in self.ids]
        cut = len(known) > max_tokens - 2
        return [BOS, *known[:max_tokens - 2], EOS], unknown, cut

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids if i not in (PAD, BOS, EOS))

    def batch(self, captions, max_tokens=MAX_TOKENS):
        """(B, L) int64 ids, padded with PAD to the longest (L <= max_tokens); unknown words are left out
        (callers that take a user's words check them with encode() first)."""
        ids = [self.encode(c, max_tokens)[0] for c in captions]
        out = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.long)
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row)
        return out

def empty(n, device="cpu"):
    """n empty captions, [BOS, EOS]: the unconditional model's (B, 2)."""
    return torch.tensor([[BOS, EOS]], device=device).expand(n, 2)

# -----------------------------------------------------------------------------
# the encoder: token and position embeddings, pre-norm transformer blocks


class Block(nn.Module):
    """[TF]'s encoder block, pre-norm: x + attention(LN(x)), then x + MLP(LN(x)); padding is never a key."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):  # x (B, L, D), mask (B, L) True at tokens
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, nh, L, hs)
        x = x + self.proj(h.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> (the context, one vector per token (B, L, dim); the mask, True at tokens
    (B, L))."""

    def __init__(self, vocab_size, dim=256, layers=3, heads=4, max_tokens=MAX_TOKENS):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_tokens, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids):
        mask = ids != PAD
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)[None]  # (B, L, dim)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x), mask

# -----------------------------------------------------------------------------
# CelebA's captions: a sentence from a face's attributes, a new one at every draw


# Per attribute, its phrasings present | absent (an empty side: none). The first of each side is held out of
# training: known words in a form the model was not taught, to measure whether it follows words, not just
# the sentences it saw. The subject comes from Male and Young.
PHRASES = """
5_o_Clock_Shadow: who has stubble, with stubble, with light stubble, with a five o'clock shadow |
Arched_Eyebrows: with eyebrows arched, with arched eyebrows, with curved eyebrows |
Attractive: who is good looking, good looking, attractive, who is attractive |
Bags_Under_Eyes: who has bags under the eyes, with bags under the eyes, with tired eyes |
Bald: who is bald, bald, who has no hair |
Bangs: who has bangs, with bangs, wearing bangs, with a fringe |
Big_Lips: who has big lips, with big lips, with full lips | who has thin lips, with thin lips, with small lips
Big_Nose: who has a big nose, with a big nose, with a large nose | who has a small nose, with a small nose
Black_Hair: who has black hair, with black hair, black haired |
Blond_Hair: who has blond hair, with blond hair, blond haired, blond | who is not blond, not blond
Blurry: who is blurry, blurry, blurred | who is sharp, sharp, in sharp focus
Brown_Hair: who has brown hair, with brown hair, brown haired |
Bushy_Eyebrows: who has bushy eyebrows, with bushy eyebrows, with thick eyebrows |
Chubby: who is chubby, chubby, plump |
Double_Chin: who has a double chin, with a double chin |
Eyeglasses: who has glasses, with glasses, wearing glasses, with eyeglasses | who has no glasses, without \
glasses, with no glasses, not wearing glasses
Goatee: who has a goatee, with a goatee |
Gray_Hair: who has gray hair, with gray hair, gray haired, with grey hair |
Heavy_Makeup: who is wearing makeup, wearing makeup, with heavy makeup | who has no makeup, without makeup
High_Cheekbones: who has high cheekbones, with high cheekbones |
Male: person who is a man, man, male | person who is a woman, woman, female
Mouth_Slightly_Open: with an open mouth, with the mouth open, with the mouth slightly open | with a closed \
mouth, with the mouth closed
Mustache: who has a mustache, with a mustache |
Narrow_Eyes: who has narrow eyes, with narrow eyes, squinting |
No_Beard: who has no beard, without a beard, with no beard, clean shaven | who has a beard, with a beard, \
bearded
Oval_Face: who has an oval face, with an oval face |
Pale_Skin: who has pale skin, with pale skin, pale |
Pointy_Nose: who has a pointy nose, with a pointy nose |
Receding_Hairline: who has a receding hairline, with a receding hairline |
Rosy_Cheeks: who has rosy cheeks, with rosy cheeks, with red cheeks |
Sideburns: who has sideburns, with sideburns |
Smiling: who is smiling, smiling, with a smile, who smiles | who is not smiling, not smiling, serious, \
with a serious face
Straight_Hair: who has straight hair, with straight hair |
Wavy_Hair: who has wavy hair, with wavy hair, wavy haired, with curly hair |
Wearing_Earrings: who is wearing earrings, wearing earrings, with earrings |
Wearing_Hat: who is wearing a hat, wearing a hat, with a hat | who has no hat, without a hat, with no hat
Wearing_Lipstick: who is wearing lipstick, wearing lipstick, with lipstick |
Wearing_Necklace: who is wearing a necklace, wearing a necklace, with a necklace |
Wearing_Necktie: who is wearing a tie, wearing a tie, with a tie |
Young: person who is young, young, youthful | person who is elderly, elderly, older
"""
# (Male, Young) -> the subject's words, the first held out
SUBJECTS = {(1, 1): ("man who is young", "young man", "boy"),
            (1, 0): ("man who is elderly", "elderly man", "older man"),
            (0, 1): ("woman who is young", "young woman", "girl"),
            (0, 0): ("woman who is elderly", "elderly woman", "older woman")}
OPENINGS = ("a photo of", "a portrait of", "a picture of", "a close up of", "an image of")
MAX_PARTS = 8  # attributes a caption names at most: about 50 tokens


@functools.cache
def phrasings():
    """{attribute: ([present phrasings], [absent phrasings])}, from PHRASES (read once)."""
    table = {}
    for line in PHRASES.replace("\\\n", " ").strip().splitlines():
        name, _, sides = line.partition(":")
        present, _, absent = sides.partition("|")
        sides = ([p.strip() for p in side.split(",") if p.strip()] for side in (present, absent))
        table[name.strip()] = tuple(sides)
    return table


def caption(attrs, names, gen, held_out=False):
    """A sentence for a face of attributes `attrs` (K,) 0/1 named `names`, drawn with `gen` (a CPU generator):
    a random subset of its attributes (0 to MAX_PARTS of them), in a random order, each in a random phrasing
    of its state (where that state has one); Male and Young always name the subject (REPORT 3.12: without
    them a 15-minute model ignored its captions). `held_out`: only the phrasings kept out of training."""
    table = phrasings()
    value = dict(zip(names, attrs.tolist()))
    k = int(torch.randint(MAX_PARTS + 1, (1,), generator=gen))
    chosen = [names[i] for i in torch.randperm(len(names), generator=gen)[:k].tolist()]
    chosen += [n for n in ("Male", "Young") if n in names and n not in chosen]  # the subject, always named
    parts = [pick(table[n][1 - value[n]], held_out, gen) for n in chosen if n not in ("Male", "Young")]
    parts = [p for p in parts if p]
    sex = value["Male"] if "Male" in chosen else None
    age = value["Young"] if "Young" in chosen else None
    subject = "person"
    if sex is not None and age is not None:
        subject = pick(SUBJECTS[(sex, age)], held_out, gen)
    elif sex is not None:
        subject = pick(table["Male"][1 - sex], held_out, gen)
    elif age is not None:
        subject = pick(table["Young"][1 - age], held_out, gen)
        if not subject.startswith("person"):
            subject += " person"
    if not parts and subject == "person":
        return ""
    opening = OPENINGS[int(torch.randint(len(OPENINGS), (1,), generator=gen))]
    article = "an" if subject[0] in "aeiou" else "a"
    return " ".join([opening, article, subject, ", ".join(parts)]).strip()


def pick(options, held_out, gen):
    """A phrasing: the held-out first one, or one of the others at random ("" where there is none)."""
    if not options:
        return ""
    if held_out:
        return options[0]
    rest = options[1:]
    return rest[int(torch.randint(len(rest), (1,), generator=gen))]


def celeba_vocab(names):
    """The tokenizer of CelebA's training captions: every word they can hold (the held-out phrasings are made
    of these words too, in other forms)."""
    table = phrasings()
    texts = list(OPENINGS) + ["person"] + [w for subjects in SUBJECTS.values() for w in subjects[1:]]
    for name in names:
        for side in table[name]:
            texts += side[1:]
    return Tokenizer.build(texts)


class Captions:
    """A CelebA text run's condition: for each face of a batch, a new sentence of its attributes at every
    draw, drawn with a generator seeded by the run's seed and the step (a resume draws what the uninterrupted
    run did), as tokens (B, L). `held_out`: the phrasings kept out of training (for measuring)."""

    def __init__(self, tokenizer, names, seed, max_tokens=MAX_TOKENS, held_out=False):
        self.tokenizer = tokenizer
        self.names = tuple(names)
        self.seed = seed
        self.max_tokens = max_tokens
        self.held_out = held_out

    def __call__(self, attrs, step):
        """attrs (B, K) 0/1 of the global batch -> its captions' tokens (B, L)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63 + 7)
        sentences = [caption(row, self.names, gen, self.held_out) for row in attrs.cpu()]
        return self.tokenizer.batch(sentences, self.max_tokens)


def drop(tokens, gen, batch_size, shard, p_uncond):
    """Condition dropout for text ([CFG] Algorithm 1, line 3): each caption of the global batch becomes the
    empty caption with probability p_uncond (drawn from `gen` for the global batch, this rank's shard
    kept)."""
    dropped = (torch.rand(batch_size, 1, generator=gen, device=tokens.device) < p_uncond)[shard]
    nothing = torch.full_like(tokens, PAD)
    nothing[:, :2] = empty(1, tokens.device)
    return torch.where(dropped, nothing, tokens)


# -----------------------------------------------------------------------------
# a text run's condition: a folder's captions, or CelebA's made from its attributes


def condition(faces, max_tokens, seed, vocab=None, log=print):
    """A text run's condition of `faces` (data.load's dict of the train split): the folder's own captions
    (each image's tokens, fixed), or for CelebA sentences of each face's attributes, new at every step. The
    tokenizer: `vocab` (a resumed model's words), or built from the captions (CelebA's: every word its
    sentences can hold). -> faces with its condition: cond, the batches' (N, L) tokens or (N, K) attributes;
    caption, the Captions that make CelebA's sentences, or None; the tokenizer and its vocab."""
    found = captions_of(dict(faces, split="train"))
    if vocab is not None:
        tokenizer = Tokenizer(vocab)
    elif found is not None:
        tokenizer = Tokenizer.build(found)
    else:
        tokenizer = celeba_vocab(faces["attr_names"])
    if found is None:
        example = caption(torch.ones(len(faces["attr_names"]), dtype=torch.long), faces["attr_names"],
                          torch.Generator().manual_seed(0))
        log(f"text: CelebA's captions, made from its {len(faces['attr_names'])} attributes at every step "
            f"(e.g. {example!r}); {len(tokenizer.vocab) - len(SPECIAL):,} words")
        captions = Captions(tokenizer, faces["attr_names"], seed, max_tokens)
        return dict(faces, cond=faces["attrs"], caption=captions, tokenizer=tokenizer, vocab=tokenizer.vocab)
    cut = [f for f, c in zip(faces["files"], found) if tokenizer.encode(c, max_tokens)[2]]
    if cut:
        log(f"note: {len(cut):,} captions are longer than {max_tokens} tokens and were cut "
            f"({os.path.basename(cut[0])} the first)")
    log(f"text: {len(found):,} captions of {len(tokenizer.vocab) - len(SPECIAL):,} words")
    tokens = tokenizer.batch(found, max_tokens)
    return dict(faces, cond=tokens, caption=None, tokenizer=tokenizer, vocab=tokenizer.vocab)


def captions_of(sel):
    """A text run's captions of a data.select()ion: the folder's own (data.captions), or None for CelebA,
    whose captions are made from its attributes; a folder of neither is refused."""
    found = data.captions(sel)
    if found is None and sel["attrs"] is None:
        raise data.DataError(f"data folder {sel['image_dir']}: no captions (a .txt beside each image, or a "
                             "metadata.jsonl) and no CelebA attributes to make them from")
    return found


def validation_condition(tokenizer, max_tokens, v, n):
    """The tokens of the first n validation images' captions (v: data.load's dict of the valid split): their
    own, or sentences of their attributes (the same at every evaluation)."""
    found = data.captions(dict(v, files=v["files"][:n], split="valid"))
    if found is not None:
        return tokenizer.batch(found, max_tokens)
    return Captions(tokenizer, v["attr_names"], 0, max_tokens)(v["attrs"][:n], 0)


# -----------------------------------------------------------------------------
# DreamBooth ([DB] Ruiz et al. 2023; diffusers examples/dreambooth/train_dreambooth.py): a trained text model,
# fine-tuned on 3-5 photos of one person, learns a new word for that person ("a photo of sks person"), while
# prior preservation keeps what it knew of the person's class ("a photo of a person"):
#
#     L = E || eps - eps(x_t, t, c_instance) ||^2  +  lambda E || eps' - eps(x'_t', t', c_class) ||^2
#
# x: the person's photos (their latents, for a latent model); x': class images that the model drew for the
# class prompt before training, frozen at that moment ([DB] eq. 2, the class-specific prior preservation
# loss); lambda: the prior's weight (1 in [DB]). Without the second term a few hundred steps on three photos
# make every "person" that person, and the model forgets the variety it had (language drift).
#
# The rare word is new to the model: the tokenizer's vocabulary grows by it, and the text encoder's token
# embedding by one row per new word, which starts as the mean of the known words' rows (the other weights are
# the model's own).

# The class images are drawn unguided (W = 1): they hold eps(., c_class) to the model's own conditional
# answers, and sampling then guides it as it did the base. Drawn at sample.py's W = 3, they taught the
# conditional branch the guided faces, and guidance at W = 3 on top drew the class washed out (REPORT 3.14).
CLASS_GUIDANCE = 1.0
EMBEDDING = "text_encoder.tokens.weight"  # the token embedding in a text U-Net's state dict


def grow_vocab(weights, vocab, prompt):
    """A text model's weights and vocabulary with the words of `prompt` it does not know added: the
    vocabulary at its end, the token embedding by a row per word (the mean of the known rows). -> (the
    weights, a new dict; the vocabulary, a tuple; the new words)."""
    new = [w for w in dict.fromkeys(words(prompt)) if w not in vocab]
    if not new:
        return dict(weights), tuple(vocab), []
    table = weights[EMBEDDING]  # (V, D)
    mean = table[len(SPECIAL):].mean(0, keepdim=True)  # of the words (not padding, BOS, EOS)
    grown = dict(weights)
    grown[EMBEDDING] = torch.cat([table, mean.expand(len(new), -1)])
    return grown, tuple(vocab) + tuple(new), new


@torch.no_grad()
def draw_class_images(model, diffusion, shape, tokens, n, seed, batch, device, ctx, clip, callback=None):
    """n samples (n, C, H, W) of the frozen `model` for the class prompt's tokens (L,), as the model learns
    them (latents stay latents): 20-step DDIM, at CLASS_GUIDANCE against the empty caption, from a
    generator seeded with `seed`, x0 clipped to [-1, 1] if `clip` (a pixel model's). callback(images done)
    after each batch."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = tokens.to(device)
    empty = torch.full_like(tokens, PAD)
    empty[:2] = torch.tensor([BOS, EOS])  # the empty caption, padded as the prompt
    fn = guided(model, tokens, CLASS_GUIDANCE, empty, "text")
    drawn = []
    for i in range(0, n, batch):
        x_T = torch.randn((min(batch, n - i), *shape), generator=g, device=device)
        with ctx:
            drawn.append(diffusion.sample(fn, x_T.shape, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_ETA, g,
                                          x_T=x_T, clip=clip).float().cpu())
        if callback:
            callback(i + len(x_T))
    return torch.cat(drawn)


class PriorPreservation(Denoising):
    """[DB]'s objective: a DDPM's loss on the person's photos and their caption, plus `prior_weight` times
    its loss on as many class images with the class prompt, drawn from `class_x0` (n, C, H, W) by the step's
    generator. No caption is dropped: the photos dropped to the empty caption would teach the model's
    unconditional branch the person, and guidance, which pushes every prompt away from that branch, would
    then push the class prompt's samples away from faces (REPORT sec. 3.14). Its grids draw the person:
    the instance prompt's samples."""
    face_steps = None  # it starts from a model that draws faces

    def __init__(self, *args, class_x0, class_tokens, instance_tokens, prior_weight, **kw):
        super().__init__(*args, **kw)
        self.drop = self.kept
        self.class_x0 = class_x0
        self.class_tokens = class_tokens  # (L,)
        self.instance_tokens = instance_tokens  # (L,)
        self.prior_weight = prior_weight

    @staticmethod
    def kept(tokens, gen):
        """The captions as they are (the condition dropout of a DDPM's loss, off)."""
        return tokens

    def losses(self, x0, cond, gen):
        instance = super().losses(x0, cond, gen)
        if not self.prior_weight:
            return instance
        B = self.batch_size
        pick = torch.randint(0, len(self.class_x0), (B,), generator=gen, device=x0.device)[self.shard]
        x0_class = self.class_x0.to(x0.device)[pick].contiguous(memory_format=self.memory_format)
        cond_class = self.class_tokens.to(x0.device).expand(len(x0_class), -1)
        prior = super().losses(x0_class, cond_class, gen)
        return lambda model: instance(model) + self.prior_weight * prior(model)

    def grid(self, ema, examples, n, batch, ctx, callback=None, inputs=None):
        text = self.instance_tokens.to(self.diffusion.betas.device).expand(n, -1)
        return super().grid(ema, examples, n, batch, ctx, callback, dict(text=text))
