"""Deep mutual learning of two peers of your own network, on your own images, in a plain loop.

    python train_two_peers.py [IMAGE_FOLDER]     # default: a tiny generated folder, seconds on a CPU
"""

import sys
from pathlib import Path

import torch

import dml
from make_images import make_images
from mynets import small_cnn

root = Path(sys.argv[1]) if len(sys.argv) > 1 else make_images(Path("demo_images"))
data = dml.load_image_folder(root)  # uint8 tensors, classes from the folder names, mean/std of the training images
mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)


def batches(split, batch_size, shuffle):
    order = torch.randperm(len(split)) if shuffle else torch.arange(len(split))
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        yield (split.images[idx].float() / 255 - mean) / std, split.labels[idx]


torch.manual_seed(0)
models = [small_cnn(data.num_classes) for _ in range(2)]
optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
with dml.Cohort(models, optimizers, loss=dml.MutualLoss(temperature=1.0, kl_weight=1.0)) as cohort:
    for epoch in range(1, 6):
        for x, y in batches(data.train, 16, shuffle=True):
            out = cohort.step(x, y)
        result = cohort.evaluate(batches(data.test, 100, shuffle=False))
        print(f"epoch {epoch}: train loss {' '.join(f'{l.item():.3f}' for l in out.losses)}, test top-1 "
              f"{' '.join(f'{a:.1f}%' for a in result.top1)}, ensemble {result.ensemble_top1:.1f}%")
