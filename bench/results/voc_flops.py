# FLOPs of one default bench.voc training step and one full-image evaluation (torch's FlopCounterMode: convolutions,
# matmuls and their backward; elementwise ops not counted).
import torch, torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
import zoo
from zoo import segmentation as M

torch.manual_seed(0)
for backbone in ("resnet50", "vgg16_bn"):
    for name in ("unrolled", "unet"):
        model = M.build(name, zoo.classifier(backbone, 21), 21).train()
        x = torch.randn(10, 3, 256, 256)
        rows = torch.arange(5)
        mask = torch.randint(0, 21, (5, 256, 256))
        with FlopCounterMode(display=False) as fc:
            out = model(x, samples=rows)
            loss = F.cross_entropy(out.seg, mask)
            if out.logits is not None:
                loss = loss + F.binary_cross_entropy_with_logits(out.logits, torch.rand(10, 21))
            loss.backward()
        step = fc.get_total_flops()
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, 375, 500))
        ev = fc.get_total_flops()
        print(f"{backbone} {name}: train step (batch 10, 5 pixel rows, 256px) {step / 1e12:.2f} TFLOP; "
              f"eval of one 500x375 image {ev / 1e12:.3f} TFLOP; 10000 steps {step * 1e4 / 1e15:.1f} PFLOP; "
              f"1449 val images {ev * 1449 / 1e15:.2f} PFLOP", flush=True)
