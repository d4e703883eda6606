"""
DreamBooth ([DB] Ruiz et al. 2023; diffusers examples/dreambooth/train_dreambooth.py): a trained text model,
fine-tuned on 3-5 photos of one person, learns a new word for that person ("a photo of sks person"), while
prior preservation keeps what it knew of the person's class ("a photo of a person"):

    L = E || eps - eps(x_t, t, c_instance) ||^2  +  lambda E || eps' - eps(x'_t', t', c_class) ||^2

x: the person's photos (their latents, for a latent model); x': class images that the model drew for the
class prompt before training, frozen at that moment ([DB] eq. 2, the class-specific prior preservation
loss); lambda: the prior's weight (1 in [DB]). Without the second term a few hundred steps on three photos
make every "person" that person, and the model forgets the variety it had (language drift).

The rare word is new to the model: the tokenizer's vocabulary grows by it, and the text encoder's token
embedding by one row per new word, which starts as the mean of the known words' rows (the other weights are
the model's own).
"""
import torch

import text as texts
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, Denoising, guided

CLASS_GUIDANCE = 3.0  # the class images are drawn as sample.py draws: at its default guidance weight
EMBEDDING = "text_encoder.tokens.weight"  # the token embedding in a text U-Net's state dict


def grow_vocab(weights, vocab, prompt):
    """A text model's weights and vocabulary with the words of `prompt` it does not know added: the
    vocabulary at its end, the token embedding by a row per word (the mean of the known rows). -> (the
    weights, a new dict; the vocabulary, a tuple; the new words)."""
    new = [w for w in dict.fromkeys(texts.words(prompt)) if w not in vocab]
    if not new:
        return dict(weights), tuple(vocab), []
    table = weights[EMBEDDING]  # (V, D)
    mean = table[len(texts.SPECIAL):].mean(0, keepdim=True)  # of the words (not padding, BOS, EOS)
    grown = dict(weights)
    grown[EMBEDDING] = torch.cat([table, mean.expand(len(new), -1)])
    return grown, tuple(vocab) + tuple(new), new


@torch.no_grad()
def draw_class_images(model, diffusion, shape, tokens, n, seed, batch, device, ctx, clip, callback=None):
    """n samples (n, C, H, W) of the frozen `model` for the class prompt's tokens (L,), as the model learns
    them (latents stay latents): 20-step DDIM, guided at CLASS_GUIDANCE against the empty caption, from a
    generator seeded with `seed`, x0 clipped to [-1, 1] if `clip` (a pixel model's). callback(images done)
    after each batch."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = tokens.to(device)
    empty = torch.full_like(tokens, texts.PAD)
    empty[:2] = torch.tensor([texts.BOS, texts.EOS])  # the empty caption, padded as the prompt
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
    generator. Its grids draw the person: the instance prompt's samples."""
    face_steps = None  # it starts from a model that draws faces

    def __init__(self, *args, class_x0, class_tokens, instance_tokens, prior_weight, **kw):
        super().__init__(*args, **kw)
        self.class_x0 = class_x0
        self.class_tokens = class_tokens  # (L,)
        self.instance_tokens = instance_tokens  # (L,)
        self.prior_weight = prior_weight

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
