"""Stand-in for I-JEPA's src/masks/multiblock.py: the reference's procedure, with its
counter-seeded block sizes and global-RNG corners on the exclusive range."""

import math
from multiprocessing import Value

import torch


class MaskCollator:
    def __init__(self, input_size=(224, 224), patch_size=16, enc_mask_scale=(0.2, 0.8), pred_mask_scale=(0.2, 0.8),
                 aspect_ratio=(0.3, 3.0), nenc=1, npred=2, min_keep=4, allow_overlap=False):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.enc_mask_scale, self.pred_mask_scale, self.aspect_ratio = enc_mask_scale, pred_mask_scale, aspect_ratio
        self.nenc, self.npred, self.min_keep, self.allow_overlap = nenc, npred, min_keep, allow_overlap
        self._itr_counter = Value("i", -1)

    def step(self):
        with self._itr_counter.get_lock():
            self._itr_counter.value += 1
            return self._itr_counter.value

    def _sample_block_size(self, generator, scale, aspect_ratio_scale):
        u = torch.rand(1, generator=generator).item()
        max_keep = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        ar = aspect_ratio_scale[0] + u * (aspect_ratio_scale[1] - aspect_ratio_scale[0])
        h, w = int(round(math.sqrt(max_keep * ar))), int(round(math.sqrt(max_keep / ar)))
        return min(h, self.height - 1), min(w, self.width - 1)

    def _sample_block_mask(self, b_size, acceptable_regions=None):
        h, w = b_size
        relaxed, budget = 0, 20
        while True:
            top = int(torch.randint(0, self.height - h, (1,)))
            left = int(torch.randint(0, self.width - w, (1,)))
            grid = torch.zeros((self.height, self.width), dtype=torch.int32)
            grid[top : top + h, left : left + w] = 1
            if acceptable_regions is not None:
                for region in acceptable_regions[: max(len(acceptable_regions) - relaxed, 0)]:
                    grid *= region
            idx = torch.nonzero(grid.flatten()).squeeze(1)
            if len(idx) > self.min_keep:
                break
            budget -= 1
            if budget == 0:
                relaxed, budget = relaxed + 1, 20
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top : top + h, left : left + w] = 0
        return idx, complement

    def __call__(self, batch):
        B = len(batch)
        collated = torch.utils.data.default_collate(batch)
        g = torch.Generator()
        g.manual_seed(self.step())
        p_size = self._sample_block_size(g, self.pred_mask_scale, self.aspect_ratio)
        e_size = self._sample_block_size(g, self.enc_mask_scale, (1.0, 1.0))
        preds, encs = [], []
        for _ in range(B):
            drawn = [self._sample_block_mask(p_size) for _ in range(self.npred)]
            preds.append([d[0] for d in drawn])
            regions = None if self.allow_overlap else [d[1] for d in drawn]
            encs.append([self._sample_block_mask(e_size, regions)[0] for _ in range(self.nenc)])
        kp = min(len(m) for ms in preds for m in ms)
        ke = min(len(m) for ms in encs for m in ms)
        masks_pred = [torch.stack([preds[b][j][:kp] for b in range(B)]) for j in range(self.npred)]
        masks_enc = [torch.stack([encs[b][i][:ke] for b in range(B)]) for i in range(self.nenc)]
        return collated, masks_enc, masks_pred
