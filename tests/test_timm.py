"""Every timm architecture family, by its smallest member: the piecewise-linear ones compile and their heatmaps equal
autograd input x gradient in float64 (random weights, pretrained=False, nothing downloaded); the others are refused
with an UnsupportedModelError naming the ops in the way.

The tables below are the census `python -m bench.census timm` measured on timm 1.0.31 (families and their smallest
members: bench/results/timm_representatives.json). A family a later timm adds is in no table and is reported
(skipped with its name) until someone classifies it here. Three tiers: the fast suite checks a sample (FAST_*),
`slow` adds the families issue 14 found wrongly refused (SLOW_*); the whole table (about 15 min on 2 cores) runs
with UNROLL_CENSUS=1, like `python -m bench.census timm`.
"""
import os

import pytest

timm = pytest.importorskip("timm")

from bench.census import check_timm, timm_families, timm_representatives  # noqa: E402

from pathlib import Path  # noqa: E402

REPRESENTATIVES = Path(__file__).resolve().parents[1] / "bench" / "results" / "timm_representatives.json"

# family -> (smallest member, the input shapes one compilation serves: "any" or the guard's shape); the comment:
# max relative error vs autograd and seconds, as the census measured them (2 loaded cores, one thread)
EXACT = {
    'convmixer': ('convmixer_768_32', 'any'),  # 3.1e-15, 56.2s
    'cspdarknet': ('cspdarknet53', 'any'),  # 2.1e-15, 27.9s
    'cspresnet': ('cspresnet50', 'any'),  # 3.2e-15, 23.1s
    'cspresnext': ('cspresnext50', 'any'),  # 1.8e-15, 26.1s
    'darknet': ('darknet17', 'any'),  # 1.8e-15, 11.8s
    'darknetaa': ('darknetaa53', 'any'),  # 8.0e-16, 28.9s
    'densenet': ('densenet121', 'any'),  # 7.4e-16, 17.3s
    'densenetblur': ('densenetblur121d', 'any'),  # 7.4e-16, 15.3s
    'dla': ('dla46x_c', 'any'),  # 8.0e-16, 2.6s
    'efficientnet': ('efficientnet_lite0', 'any'),  # 2.6e-15, 7.2s
    'fbnetc': ('fbnetc_100', 'any'),  # 2.4e-15, 5.8s
    'gernet': ('gernet_s', 'any'),  # 2.7e-15, 9.1s
    'hgnetv2': ('hgnetv2_b0', 'any'),  # 1.3e-15, 4.8s
    'hrnet': ('hrnet_w18_small', 'any'),  # 1.4e-15, 10.9s
    'inception_resnet': ('inception_resnet_v2', 'any'),  # 6.8e-16, 48.9s
    'inception_v3': ('inception_v3', 'any'),  # 3.2e-15, 18.5s
    'inception_v4': ('inception_v4', 'any'),  # 1.4e-15, 39.7s
    'legacy_xception': ('legacy_xception', 'any'),  # 2.4e-15, 23.2s
    'mobilenet_edgetpu': ('mobilenet_edgetpu_100', 'any'),  # 3.7e-15, 12.4s
    'mobilenetv1': ('mobilenetv1_100', 'any'),  # 1.1e-15, 6.7s
    'mobilenetv2': ('mobilenetv2_035', 'any'),  # 1.3e-15, 6.8s
    'mobilenetv4': ('mobilenetv4_conv_small_035', 'any'),  # 1.3e-15, 5.7s
    'mobileone': ('mobileone_s1', 'any'),  # 2.3e-15, 20.7s
    'nasnetalarge': ('nasnetalarge', '(2, 3, 64, 61)'),  # 6.7e-16, 95.1s
    'nf_resnet': ('nf_resnet26', 'any'),  # 0.0e+00, 11.4s
    'pnasnet5large': ('pnasnet5large', '(2, 3, 64, 61)'),  # 1.2e-15, 89.0s
    'regnetx': ('regnetx_002', 'any'),  # 2.0e-15, 4.7s
    'repvgg': ('repvgg_a0', 'any'),  # 1.9e-15, 10.7s
    'res2net': ('res2net50_14w_8s', 'any'),  # 3.6e-15, 16.2s
    'res2next': ('res2next50', 'any'),  # 4.3e-15, 17.4s
    'resnet': ('resnet10t', 'any'),  # 6.4e-16, 3.3s
    'resnetaa': ('resnetaa34d', 'any'),  # 1.1e-15, 11.0s
    'resnetblur': ('resnetblur18', 'any'),  # 9.0e-16, 6.6s
    'resnetv2': ('resnetv2_18', 'any'),  # 1.1e-15, 6.8s
    'resnext': ('resnext50_32x4d', 'any'),  # 1.1e-15, 19.2s
    'selecsls': ('selecsls42', 'any'),  # 2.6e-15, 10.2s
    'spnasnet': ('spnasnet_100', 'any'),  # 2.7e-15, 8.3s
    'test_resnet': ('test_resnet', 'any'),  # 7.6e-16, 0.9s
    'tf_efficientnet': ('tf_efficientnet_lite0', '(2, 3, 64, 61)'),  # 1.2e-15, 7.1s
    'vgg': ('vgg11', '(2, 3, 64, 61)'),  # 1.1e-15, 16.7s
    'vovnet': ('vovnet39a', 'any'),  # 1.6e-15, 12.7s
    'wide_resnet': ('wide_resnet50_2', 'any'),  # 3.6e-15, 38.0s
    'xception': ('xception41p', 'any'),  # 1.6e-15, 23.2s
}
# family -> (smallest member, what the refusal must name: ops without a rule, or the untraceable construct)
REFUSED = {
    'aimv2': ('aimv2_large_patch14_224', ('SiLU', 'rms_norm', 'scaled_dot_product_attention')),
    'beit': ('beit_base_patch16_224', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'beit.vision_transformer': ('beit3_base_patch16_224', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'beitv2': ('beitv2_base_patch16_224', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'botnet': ('botnet26t_256', ('matmul', 'softmax')),
    'caformer': ('caformer_s18', ('layer_norm', 'pow', 'scaled_dot_product_attention')),
    'cait': ('cait_xxs24_224', ('GELU', 'LayerNorm', 'matmul')),
    'coat': ('coat_tiny', ('GELU', 'LayerNorm', 'layer_norm')),
    'coatnet': ('coatnet_pico_rw_224', ('SiLU', 'gelu', 'layer_norm')),
    'coatnext': ('coatnext_nano_rw_224', ('gelu', 'layer_norm', 'scaled_dot_product_attention')),
    'convformer': ('convformer_s18', ('layer_norm', 'pow', 'square')),
    'convit': ('convit_tiny', ('could not trace',)),
    'convnext': ('convnext_zepto_rms', ('gelu', 'rsqrt', 'var')),
    'convnextv2': ('convnextv2_atto', ('addcmul', 'gelu', 'layer_norm')),
    'cpubone': ('cpubone_nano', ('GELU', 'Hardswish', 'LayerNorm')),
    'cs': ('cs3se_edgenet_x', ('SiLU', 'sigmoid')),
    'cs3darknet': ('cs3darknet_focus_s', ('SiLU',)),
    'cs3edgenet': ('cs3edgenet_x', ('SiLU',)),
    'cs3sedarknet': ('cs3sedarknet_xdw', ('SiLU', 'sigmoid')),
    'csatv2': ('csatv2', ('GELU', 'LayerNorm', 'addcmul')),
    'cspnext': ('cspnext_tiny', ('Hardsigmoid', 'SiLU')),
    'davit': ('davit_tiny', ('GELU', 'layer_norm', 'matmul')),
    'deepseek_vit': ('deepseek_vit_412m', ('SiLU', 'rms_norm', 'scaled_dot_product_attention')),
    'deit': ('deit_tiny_patch16_224', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'dm_nfnet': ('dm_nfnet_f0', ('gelu', 'sigmoid')),
    'dpn': ('dpn48b', ('SiLU',)),
    'eca_botnext': ('eca_botnext26ts_256', ('SiLU', 'matmul', 'sigmoid')),
    'eca_halonext': ('eca_halonext26ts', ('SiLU', 'matmul', 'sigmoid')),
    'eca_nfnet': ('eca_nfnet_l0', ('SiLU', 'sigmoid')),
    'eca_resnet': ('eca_resnet33ts', ('SiLU', 'sigmoid')),
    'eca_resnext': ('eca_resnext26ts', ('SiLU', 'sigmoid')),
    'eca_vovnet': ('eca_vovnet39b', ('sigmoid',)),
    'ecaresnet': ('ecaresnet26t', ('sigmoid',)),
    'ecaresnetlight': ('ecaresnetlight', ('sigmoid',)),
    'ecaresnext': ('ecaresnext26t_32x4d', ('sigmoid',)),
    'edgenext': ('edgenext_xx_small', ('GELU', 'LayerNorm', 'layer_norm')),
    'efficientformer': ('efficientformer_l1', ('GELU', 'LayerNorm', 'matmul')),
    'efficientformerv2': ('efficientformerv2_s0', ('gelu', 'matmul', 'softmax')),
    'efficientnetv2': ('efficientnetv2_rw_t', ('SiLU', 'Sigmoid')),
    'efficientvim': ('efficientvim_m1', ('SiLU', 'layer_norm', 'matmul')),
    'efficientvit': ('efficientvit_b0', ('could not trace',)),
    'efficientvit.efficientvit_msra': ('efficientvit_m0', ('matmul', 'sigmoid', 'softmax')),
    'ese_vovnet': ('ese_vovnet19b_slim_dw', ('Hardsigmoid',)),
    'eva': ('eva02_tiny_patch14_224', ('SiLU', 'layer_norm', 'scaled_dot_product_attention')),
    'eva.vision_transformer': ('eva_large_patch14_196', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'fasternet': ('fasternet_t0', ('GELU',)),
    'fastvit': ('fastvit_t8', ('GELU', 'sigmoid')),
    'fbnetv3': ('fbnetv3_b', ('Hardsigmoid', 'Hardswish')),
    'flexivit': ('flexivit_small', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'focalnet': ('focalnet_tiny_srf', ('GELU', 'layer_norm')),
    'gc_efficientnetv2': ('gc_efficientnetv2_rw_t', ('SiLU', 'layer_norm', 'matmul')),
    'gcresnet': ('gcresnet33ts', ('SiLU', 'layer_norm', 'matmul')),
    'gcresnext': ('gcresnext26ts', ('SiLU', 'layer_norm', 'matmul')),
    'gcvit': ('gcvit_xxtiny', ('GELU', 'gelu', 'layer_norm')),
    'gemma': ('gemma4_vit_167m_enc', ('could not trace',)),
    'ghostnet': ('ghostnet_050', ('Hardsigmoid',)),
    'ghostnetv2': ('ghostnetv2_100', ('Hardsigmoid', 'Sigmoid')),
    'ghostnetv3': ('ghostnetv3_050', ('Hardsigmoid', 'Sigmoid')),
    'gmixer': ('gmixer_12_224', ('LayerNorm', 'SiLU')),
    'gmlp': ('gmlp_ti16_224', ('GELU', 'LayerNorm')),
    'halo2botnet': ('halo2botnet50ts_256', ('SiLU', 'matmul', 'softmax')),
    'halonet': ('halonet_h1', ('matmul', 'softmax', 'unfold')),
    'haloregnetz': ('haloregnetz_b', ('SiLU', 'matmul', 'sigmoid')),
    'hardcorenas': ('hardcorenas_b', ('Hardsigmoid', 'Hardswish')),
    'hgnet': ('hgnet_tiny', ('Sigmoid',)),
    'hiera': ('hiera_tiny_224', ('GELU', 'amax', 'layer_norm')),
    'hieradet': ('hieradet_small', ('gelu', 'layer_norm', 'scaled_dot_product_attention')),
    'iformer': ('iformer_t', ('GELU', 'Sigmoid', 'scaled_dot_product_attention')),
    'inception_next': ('inception_next_atto', ('GELU', 'LayerNorm')),
    'lambda_resnet': ('lambda_resnet26t', ('matmul', 'softmax')),
    'lambda_resnet26rpt': ('lambda_resnet26rpt_256', ('matmul', 'softmax')),
    'lamhalobotnet': ('lamhalobotnet50ts_256', ('SiLU', 'matmul', 'softmax')),
    'lcnet': ('lcnet_035', ('Hardsigmoid', 'Hardswish')),
    'lcnetv2': ('lcnetv2_small', ('sigmoid',)),
    'legacy_senet': ('legacy_senet154', ('Sigmoid',)),
    'legacy_seresnet': ('legacy_seresnet18', ('Sigmoid',)),
    'legacy_seresnext': ('legacy_seresnext26_32x4d', ('Sigmoid',)),
    'levit': ('levit_128s', ('Hardswish', 'matmul', 'softmax')),
    'lowformer': ('lowformer_b0', ('GELU', 'Hardswish', 'LayerNorm')),
    'mambaout': ('mambaout_femto', ('GELU', 'layer_norm')),
    'maxvit': ('maxvit_pico_rw_256', ('SiLU', 'gelu', 'layer_norm')),
    'maxxvit': ('maxxvit_rmlp_nano_rw_256', ('gelu', 'layer_norm', 'scaled_dot_product_attention')),
    'maxxvitv2': ('maxxvitv2_nano_rw_256', ('gelu', 'layer_norm', 'scaled_dot_product_attention')),
    'mixer': ('mixer_s16_224', ('GELU', 'LayerNorm')),
    'mixnet': ('mixnet_s', ('SiLU', 'Sigmoid')),
    'mnasnet': ('mnasnet_small', ('Sigmoid',)),
    'mobilenetv3': ('mobilenetv3_small_050', ('Hardsigmoid', 'Hardswish')),
    'mobilenetv5': ('mobilenetv5_base', ('GELU', 'pow', 'rsqrt')),
    'mobilevit': ('mobilevit_xxs', ('LayerNorm', 'SiLU', 'scaled_dot_product_attention')),
    'mobilevitv2': ('mobilevitv2_050', ('SiLU', 'group_norm', 'softmax')),
    'mvitv2': ('mvitv2_tiny', ('could not trace',)),
    'naflexvit': ('naflexvit_base_patch16_parfac_gap', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'nest': ('nest_tiny', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'nextvit': ('nextvit_small', ('scaled_dot_product_attention',)),
    'nf_ecaresnet': ('nf_ecaresnet26', ('sigmoid',)),
    'nf_regnet': ('nf_regnet_b0', ('SiLU', 'sigmoid')),
    'nf_seresnet': ('nf_seresnet26', ('sigmoid',)),
    'nfnet': ('nfnet_l0', ('SiLU', 'sigmoid')),
    'pit': ('pit_ti_224', ('GELU', 'LayerNorm', 'scaled_dot_product_attention')),
    'poolformer': ('poolformer_s12', ('GELU', 'group_norm', 'layer_norm')),
    'poolformerv2': ('poolformerv2_s12', ('group_norm', 'layer_norm', 'pow')),
    'pvt': ('pvt_v2_b0', ('GELU', 'LayerNorm', 'layer_norm')),
    'qwen': ('qwen3_vit_88m', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'rdnet': ('rdnet_tiny', ('Hardsigmoid', 'gelu', 'layer_norm')),
    'regnetv': ('regnetv_040', ('SiLU', 'sigmoid')),
    'regnety': ('regnety_002', ('sigmoid',)),
    'regnetz': ('regnetz_b16', ('SiLU', 'sigmoid')),
    'regnetz.regnet': ('regnetz_005', ('SiLU', 'sigmoid')),
    'repghostnet': ('repghostnet_050', ('Hardsigmoid',)),
    'repvit': ('repvit_m1', ('GELU', 'sigmoid')),
    'resmlp': ('resmlp_12_224', ('GELU', 'addcmul')),
    'resnest': ('resnest14d', ('softmax',)),
    'resnet.byobnet': ('resnet32ts', ('SiLU',)),
    'resnetrs': ('resnetrs50', ('sigmoid',)),
    'resnext.byobnet': ('resnext26ts', ('SiLU',)),
    'rexnet': ('rexnet_100', ('SiLU', 'sigmoid')),
    'rexnetr': ('rexnetr_100', ('SiLU', 'sigmoid')),
    'sam': ('sam2_hiera_tiny', ('gelu', 'layer_norm', 'scaled_dot_product_attention')),
    'samvit': ('samvit_base_patch16_224', ('GELU', 'LayerNorm', 'einsum')),
    'sebotnet': ('sebotnet33ts_256', ('SiLU', 'matmul', 'sigmoid')),
    'sedarknet': ('sedarknet21', ('sigmoid',)),
    'sehalonet': ('sehalonet33ts', ('SiLU', 'matmul', 'sigmoid')),
    'semnasnet': ('semnasnet_050', ('Sigmoid',)),
    'senet': ('senet154', ('sigmoid',)),
    'sequencer': ('sequencer2d_s', ('GELU', 'LSTM', 'LayerNorm')),
    'seresnet': ('seresnet18', ('sigmoid',)),
    'seresnet.byobnet': ('seresnet33ts', ('SiLU', 'sigmoid')),
    'seresnetaa': ('seresnetaa50d', ('sigmoid',)),
    'seresnext': ('seresnext26t_32x4d', ('sigmoid',)),
    'seresnext.byobnet': ('seresnext26ts', ('SiLU', 'sigmoid')),
    'seresnextaa': ('seresnextaa101d_32x8d', ('sigmoid',)),
    'shvit': ('shvit_s1', ('group_norm', 'matmul', 'sigmoid')),
    'skresnet': ('skresnet18', ('softmax',)),
    'skresnext': ('skresnext50_32x4d', ('softmax',)),
    'starnet': ('starnet_s050', ('cannot unroll', 'function mul')),
    'swiftformer': ('swiftformer_xs', ('GELU', 'matmul', 'normalize')),
    'swin': ('swin_s3_tiny_224', ('GELU', 'LayerNorm', 'Softmax')),
    'swinv2': ('swinv2_cr_tiny_224', ('GELU', 'LayerNorm', 'matmul')),
    'swinv2.swin_transformer_v2': ('swinv2_tiny_window16_256', ('LayerNorm', 'Softmax', 'gelu')),
    'test_byobnet': ('test_byobnet', ('sigmoid',)),
    'test_coatnet': ('test_coatnet', ('SiLU', 'gelu', 'layer_norm')),
    'test_convnext': ('test_convnext', ('gelu', 'layer_norm')),
    'test_efficientnet': ('test_efficientnet', ('SiLU', 'Sigmoid')),
    'test_mambaout': ('test_mambaout', ('SiLU', 'gelu', 'layer_norm')),
    'test_maxvit': ('test_maxvit', ('SiLU', 'gelu', 'layer_norm')),
    'test_nfnet': ('test_nfnet', ('SiLU', 'sigmoid')),
    'test_vit': ('test_vit', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'test_vit.vision_transformer_relpos': ('test_vit_relpos', ('GELU', 'LayerNorm', 'scaled_dot_product_attention')),
    'tf_efficientnetv2': ('tf_efficientnetv2_b0', ('SiLU', 'Sigmoid')),
    'tf_mixnet': ('tf_mixnet_s', ('SiLU', 'Sigmoid')),
    'tf_mobilenetv3': ('tf_mobilenetv3_small_075', ('Hardsigmoid', 'Hardswish')),
    'tiny_vit': ('tiny_vit_5m_224', ('GELU', 'LayerNorm', 'layer_norm')),
    'tinynet': ('tinynet_e', ('SiLU', 'Sigmoid')),
    'tnt': ('tnt_s_legacy_patch16_224', ('GELU', 'LayerNorm', 'Unfold')),
    'tresnet': ('tresnet_m', ('sigmoid',)),
    'twins': ('twins_svt_small', ('GELU', 'LayerNorm', 'scaled_dot_product_attention')),
    'visformer': ('visformer_tiny', ('GELU', 'matmul', 'softmax')),
    'vit': ('vit_tiny_patch16_224', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'vit.eva': ('vit_pe_spatial_tiny_patch16_512', ('GELU', 'layer_norm', 'scaled_dot_product_attention')),
    'vit.vision_transformer_hybrid': ('vit_tiny_r_s16_p8_224', ('GELU', 'group_norm', 'layer_norm')),
    'vit.vision_transformer_relpos': ('vit_srelpos_small_patch16_224', ('GELU', 'LayerNorm', 'scaled_dot_product_attention')),
    'vitamin': ('vitamin_small_224', ('GELU', 'gelu', 'layer_norm')),
    'volo': ('volo_d1_224', ('GELU', 'LayerNorm', 'Unfold')),
    'xcit': ('xcit_nano_12_p8_224', ('GELU', 'LayerNorm', 'matmul')),
}
# family -> (smallest member, why unroll gave no verdict): the model itself does not run on the census inputs
NOT_RUN = {
    'bat': ('bat_resnext26ts', 'forward fails at sizes ((64, 61), (64, 64), (96, 93), (96, 96), (128, 128), (224, 224)): A'),
    'crossvit': ('crossvit_tiny_240', 'forward fails at sizes ((64, 61), (64, 64), (96, 93), (96, 96), (128, 128), (224, 224)): R'),
}
# Piecewise-linear members of families whose smallest member is refused (dpn48b and mnasnet_small use SiLU / SE
# blocks), or that issue 14 named: checked too, so a family verdict does not hide them.
ALSO_EXACT = {"dpn68": "any", "mnasnet_100": "any", "darknet53": "any", "resnet18": "any", "selecsls42b": "any"}
FAST_EXACT = {"test_resnet", "resnet", "dla", "hgnetv2", "regnetx", "mobilenetv1", "vgg", "hrnet",
              "tf_efficientnet"}
SLOW_EXACT = {"densenet", "res2net", "inception_v3", "mobilenetv2", "repvgg", "xception", "cspresnet", "gernet",
              "vovnet", "spnasnet"}
SLOW_REFUSED = {"vit", "mobilenetv3", "swin", "botnet", "convnextv2"}
FAST_REFUSED = {"starnet", "convit", "test_efficientnet", "test_byobnet", "tf_mobilenetv3", "resnest", "test_vit",
                "convnext"}


CENSUS_TIMM = "1.0.31"  # the timm version the tables and bench/results/census-timm.json classify


def test_census_covers_timm():
    """Every family this timm lists is in one of the tables, with the same representative."""
    families = timm_families()
    assert "resnet" in families and "vgg" in families
    unknown = sorted(set(families) - set(EXACT) - set(REFUSED) - set(NOT_RUN))
    if unknown and timm.__version__ != CENSUS_TIMM:
        pytest.skip(f"timm {timm.__version__} (the census classified {CENSUS_TIMM}) lists families it has not "
                    f"classified: {unknown}; run python -m bench.census timm")
    assert not unknown, f"families of timm {timm.__version__} missing from the census tables: {unknown}"
    representatives = timm_representatives(families, str(REPRESENTATIVES))
    tables = {**EXACT, **REFUSED, **NOT_RUN}
    assert {fam: tables[fam][0] for fam in families} == representatives


CENSUS = pytest.mark.skipif(not os.environ.get("UNROLL_CENSUS"), reason="the whole timm census: UNROLL_CENSUS=1")


def tier(family, fast, slow):
    return pytest.param(family, marks=[] if family in fast else [pytest.mark.slow] if family in slow else
                        [pytest.mark.slow, CENSUS])


@pytest.mark.parametrize("family", [tier(f, FAST_EXACT, SLOW_EXACT) for f in sorted(EXACT)])
def test_exact(family, one_thread):
    name, serves = EXACT[family]
    verdict, detail, _, served = check_timm(name)
    assert (verdict, served) == ("exact", serves), detail


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALSO_EXACT))
def test_also_exact(name, one_thread):
    verdict, detail, _, served = check_timm(name)
    assert (verdict, served) == ("exact", ALSO_EXACT[name]), detail


@pytest.mark.parametrize("family", [tier(f, FAST_REFUSED, SLOW_REFUSED) for f in sorted(REFUSED)])
def test_refused_names_the_ops(family, one_thread):
    name, ops = REFUSED[family]
    verdict, detail, _, _ = check_timm(name)
    assert verdict == "refused", detail
    for op in ops:
        assert op in detail, (op, detail)
