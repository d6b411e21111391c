"""sam_edu.models: the same four classifiers in PyTorch, flax and Keras.

Identity is tested twice: equal trainable parameter counts (with the known values of ResNet-18
and the Wide ResNets), and equal outputs once the PyTorch weights are copied into the flax
variables and the Keras model (eval mode with running statistics, train mode with batch ones).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
keras = pytest.importorskip("keras")

import jax.numpy as jnp  # noqa: E402

from sam_edu.models import MODELS  # noqa: E402
from sam_edu.models import jax as flax_models  # noqa: E402
from sam_edu.models import tf as keras_models  # noqa: E402
from sam_edu.models import torch as torch_models  # noqa: E402

# trainable parameters at 10 classes, 3 input channels
KNOWN_COUNTS = {"small-cnn": 94_762, "resnet18": 11_173_962, "wrn-16-8": 10_961_370,
                "wrn-28-10": 36_479_194}
# channels of the stem conv and of the features the linear layer reads
STEM_AND_FEATURES = {"small-cnn": (32, 128), "resnet18": (64, 512), "wrn-16-8": (16, 512),
                     "wrn-28-10": (16, 640)}


def torch_count(name, input_shape, num_classes):
    """Count on the meta device: shapes only, nothing allocated or initialised."""
    with torch.device("meta"):
        return torch_models.count_params(torch_models.build(name, input_shape, num_classes))


def flax_count(name, input_shape, num_classes):
    """Count from ``jax.eval_shape``: shapes only, nothing allocated or initialised."""
    model = flax_models.build(name, input_shape, num_classes)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return flax_models.count_params(variables)


def keras_count(name, input_shape, num_classes):
    return keras_models.count_params(keras_models.build(name, input_shape, num_classes))


def test_models_tuple():
    assert MODELS == ("small-cnn", "resnet18", "wrn-16-8", "wrn-28-10")
    assert set(KNOWN_COUNTS) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_agree_across_frameworks(name):
    """Known count at 10 classes / RGB; for 100 classes and 1 channel the count changes only in
    the stem conv (9 weights per input channel and stem channel) and the linear layer."""
    stem, features = STEM_AND_FEATURES[name]
    for num_classes in (10, 100):
        for channels in (1, 3):
            expected = (KNOWN_COUNTS[name] + (channels - 3) * 9 * stem
                        + (num_classes - 10) * (features + 1))
            input_shape = (8, 8, channels)  # counts do not depend on the image size
            counts = [count(name, input_shape, num_classes)
                      for count in (torch_count, flax_count, keras_count)]
            assert counts == [expected] * 3, (num_classes, channels)


def test_count_params_takes_variables_or_params():
    model = flax_models.build("small-cnn", (8, 8, 1))
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert set(variables) == {"params", "batch_stats"}
    assert flax_models.count_params(variables) == flax_models.count_params(variables["params"])
    assert flax_models.count_params(variables) == KNOWN_COUNTS["small-cnn"] - 2 * 9 * 32


def test_keras_count_excludes_moving_statistics():
    model = keras_models.build("small-cnn", (8, 8, 1))
    batch_norm_channels = 32 + 64 + 128
    assert model.count_params() == keras_models.count_params(model) + 2 * batch_norm_channels


@pytest.mark.parametrize("module", [torch_models, flax_models, keras_models],
                         ids=["torch", "flax", "keras"])
def test_bad_arguments_name_the_argument(module):
    with pytest.raises(ValueError, match="name must be one of 'small-cnn', 'resnet18'"):
        module.build("resnet50")
    for shape in [(32, 32), (32, 0, 3), (32, 32, 3.0), "32x32x3", (32, 32, True)]:
        with pytest.raises(ValueError, match="input_shape"):
            module.build("resnet18", shape)
    with pytest.raises(ValueError, match=r"input_shape must have H, W >= 2"):
        module.build("small-cnn", (1, 8, 1))
    for num_classes in (1, 2.0, True):
        with pytest.raises(ValueError, match="num_classes"):
            module.build("small-cnn", (8, 8, 1), num_classes)
    with pytest.raises(ValueError, match="depth must be 6 n"):
        module.wide_resnet(12, 2)
    with pytest.raises(ValueError, match="widen_factor"):
        module.wide_resnet(10, 0)


def test_small_cnn_works_for_digits_mnist_and_cifar_sizes():
    for input_shape in [(8, 8, 1), (28, 28, 1), (32, 32, 3)]:
        x = np.zeros((2, *input_shape), np.float32)
        model = torch_models.build("small-cnn", input_shape)
        assert model(torch.from_numpy(x).permute(0, 3, 1, 2)).shape == (2, 10)
        model = flax_models.build("small-cnn", input_shape)
        logits = jax.eval_shape(  # shapes only: flax's eager first calls are slow on a CPU
            lambda x: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False), x)
        assert logits.shape == (2, 10)
        assert keras_models.build("small-cnn", input_shape)(x).shape == (2, 10)


# --- same weights, same outputs ---------------------------------------------------------------

def build_three(name, input_shape, num_classes):
    """The model in the three frameworks; "wrn-10-2" is a tiny Wide ResNet (one block a group)."""
    if name == "wrn-10-2":
        return tuple(module.wide_resnet(10, 2, input_shape, num_classes)
                     for module in (torch_models, flax_models, keras_models))
    return tuple(module.build(name, input_shape, num_classes)
                 for module in (torch_models, flax_models, keras_models))


def randomize_batch_norm(model):
    """Give every BatchNorm random affine parameters and running statistics, so that eval mode
    tests them (they start at gamma 1, beta 0, mean 0, variance 1)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)


def copy_torch_weights(torch_model, flax_template, keras_model):
    """Copy the PyTorch weights into flax variables (returned) and into ``keras_model``.

    The PyTorch module ``layer2.0.conv1`` is the flax submodule ``layer2_0`` > ``conv1`` and the
    Keras layer ``layer2_0_conv1``. Conv kernels go from OIHW to HWIO, linear weights from
    (out, in) to (in, out). ``flax_template`` (shapes from ``eval_shape``) checks that every flax
    variable is set and has its shape.
    """
    params, batch_stats = {}, {}
    keras_layers_set = 0
    for name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            weights = {"kernel": module.weight.detach().numpy().transpose(2, 3, 1, 0)}
            keras_weights = [weights["kernel"]]
        elif isinstance(module, torch.nn.BatchNorm2d):
            weights = {"scale": module.weight.detach().numpy(),
                       "bias": module.bias.detach().numpy()}
            stats = {"mean": module.running_mean.numpy(), "var": module.running_var.numpy()}
            nested_set(batch_stats, flax_path(name), {k: v.copy() for k, v in stats.items()})
            keras_weights = [weights["scale"], weights["bias"], stats["mean"], stats["var"]]
        elif isinstance(module, torch.nn.Linear):
            weights = {"kernel": module.weight.detach().numpy().T,
                       "bias": module.bias.detach().numpy()}
            keras_weights = [weights["kernel"], weights["bias"]]
        else:
            continue
        nested_set(params, flax_path(name), {k: v.copy() for k, v in weights.items()})
        keras_model.get_layer(name.replace(".", "_")).set_weights(keras_weights)
        keras_layers_set += 1
    variables = {"params": params, "batch_stats": batch_stats}
    shapes = jax.tree_util.tree_map(np.shape, variables)
    assert shapes == jax.tree_util.tree_map(lambda leaf: leaf.shape, flax_template)
    assert keras_layers_set == sum(1 for layer in keras_model.layers if layer.weights)
    return jax.tree_util.tree_map(jnp.asarray, variables)


def flax_path(torch_name):
    """``"layer2.0.conv1"`` -> ``("layer2_0", "conv1")``; ``"fc"`` -> ``("fc",)``."""
    *block, layer = torch_name.split(".")
    return ("_".join(block), layer) if block else (layer,)


def nested_set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def assert_same_logits(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name, input_shape", [
    ("small-cnn", (8, 8, 1)),
    ("small-cnn", (9, 7, 3)),     # odd sizes: the max-pool floors alike
    ("resnet18", (10, 10, 3)),    # stride 2 on even (10, 4) and odd (5) sizes
    ("wrn-10-2", (10, 10, 3)),
])
def test_same_weights_give_same_outputs(name, input_shape):
    torch.manual_seed(0)
    torch_model, flax_model, keras_model = build_three(name, input_shape, num_classes=5)
    randomize_batch_norm(torch_model)
    x = np.random.default_rng(0).normal(size=(4, *input_shape)).astype(np.float32)
    template = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), x, train=False))
    variables = copy_torch_weights(torch_model, template, keras_model)
    x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)

    # eval mode: BatchNorm normalises with the running statistics
    torch_model.eval()
    with torch.no_grad():
        expected = torch_model(x_nchw).numpy()
    flax_eval = jax.jit(lambda variables, x: flax_model.apply(variables, x, train=False))
    assert_same_logits(flax_eval(variables, x), expected)
    assert_same_logits(keras_model(x, training=False), expected)

    # train mode: batch statistics, and the same update of the running mean. The running
    # variance differs by design: PyTorch feeds it the unbiased batch variance (n - 1).
    first_name, first_norm = next((name, module) for name, module in torch_model.named_modules()
                                  if isinstance(module, torch.nn.BatchNorm2d))
    old_mean, old_var = first_norm.running_mean.clone(), first_norm.running_var.clone()
    torch_model.train()
    with torch.no_grad():
        expected = torch_model(x_nchw).numpy()
    flax_train = jax.jit(
        lambda variables, x: flax_model.apply(variables, x, train=True, mutable=["batch_stats"]))
    logits, updates = flax_train(variables, x)
    assert_same_logits(logits, expected)
    assert_same_logits(keras_model(x, training=True), expected)

    keras_norm = keras_model.get_layer(first_name.replace(".", "_"))
    keras_mean, keras_var = (w.numpy() for w in keras_norm.non_trainable_weights)
    flax_stats = updates["batch_stats"]
    for key in flax_path(first_name):
        flax_stats = flax_stats[key]
    flax_mean, flax_var = flax_stats["mean"], flax_stats["var"]
    np.testing.assert_allclose(flax_mean, first_norm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras_mean, first_norm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    n = x.shape[0] * x.shape[1] * x.shape[2]  # values per channel in the first BatchNorm's batch
    kept = 0.9 * old_var.numpy()  # running = kept + 0.1 * batch variance
    for running_var in (flax_var, keras_var):
        unbiased = kept + (np.asarray(running_var) - kept) * n / (n - 1)
        np.testing.assert_allclose(unbiased, first_norm.running_var.numpy(), rtol=1e-5)
    assert not np.allclose(old_mean.numpy(), flax_mean)


# --- dtypes and initialisation ------------------------------------------------------------

def flax_init(model, x):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


def test_flax_dtype_is_the_compute_dtype():
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
    model32 = flax_models.build("small-cnn", (8, 8, 1))
    model16 = flax_models.build("small-cnn", (8, 8, 1), dtype=jnp.dtype("bfloat16"))
    variables = flax_init(model16, x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}

    @jax.jit
    def train_forward(variables, x):
        logits32, _ = model32.apply(variables, x, train=True, mutable=["batch_stats"])
        logits16, state = model16.apply(variables, x, train=True, capture_intermediates=True,
                                        mutable=["batch_stats", "intermediates"])
        return logits32, logits16, state

    logits32, logits16, state = train_forward(variables, x)
    assert logits16.dtype == jnp.float32
    assert state["intermediates"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    batch_stats = jax.tree_util.tree_leaves(state["batch_stats"])
    assert {leaf.dtype for leaf in batch_stats} == {jnp.dtype("float32")}
    np.testing.assert_allclose(logits16, logits32, rtol=0.05, atol=0.05 * np.abs(logits32).max())


def test_keras_dtype_is_a_policy():
    model = keras_models.build("small-cnn", (8, 8, 1), dtype="mixed_bfloat16")
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert {w.dtype for w in model.weights} == {"float32"}
    assert model(np.zeros((2, 8, 8, 1), np.float32)).dtype == "float32"


def test_torch_dtype_is_the_parameter_dtype():
    assert {p.dtype for p in torch_models.build("small-cnn", (8, 8, 1)).parameters()} \
        == {torch.float32}
    model = torch_models.build("small-cnn", (8, 8, 1), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_he_normal_fan_out_initialisation():
    """Conv kernels have std sqrt(2 / (out_channels * 9)) in all three frameworks; BatchNorm
    starts at gamma 1, beta 0."""
    torch.manual_seed(0)
    torch_kernel = torch_models.build("small-cnn").conv3.weight.detach().numpy()
    variables = flax_init(flax_models.build("small-cnn"), np.zeros((1, 8, 8, 3), np.float32))
    flax_kernel = np.asarray(variables["params"]["conv3"]["kernel"])
    keras_model = keras_models.build("small-cnn")
    keras_kernel = keras_model.get_layer("conv3").kernel.numpy()
    expected_std = np.sqrt(2 / (128 * 9))
    for kernel in (torch_kernel, flax_kernel, keras_kernel):
        assert kernel.size == 64 * 128 * 9
        assert abs(kernel.mean()) < 0.02 * expected_std
        assert kernel.std() == pytest.approx(expected_std, rel=0.02)
    for scale, bias in [(variables["params"]["bn1"]["scale"], variables["params"]["bn1"]["bias"]),
                        [w.numpy() for w in keras_model.get_layer("bn1").trainable_weights]]:
        np.testing.assert_array_equal(scale, 1.0)
        np.testing.assert_array_equal(bias, 0.0)
