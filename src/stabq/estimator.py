"""DiscreteBottleneckClassifier: stabq's scikit-learn face over numpy arrays.

    fit(X (n, d) or (n, ...), y (n,))   trains a BottleneckClassifier with stabq.train
    predict_proba(X) (n, k)      softmax of the logits, float64
    predict(X) (n,)              classes_[argmax]
    transform(X) (n, c) int64    the discrete codes, c = num_codebooks (1 for FSQ, VQ, Gumbel)

It follows scikit-learn's developer conventions: the constructor only stores
its arguments, everything learned ends in ``_``, input is validated in one
place (:meth:`_validate`: scikit-learn's ``validate_data``, then stabq's own
finiteness check, which names the first bad row), and ``random_state`` seeds
torch, so the same ``random_state`` gives the same model. Bad input raises
:class:`stabq.errors.DataError`, a ``ValueError`` as scikit-learn expects.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils import Tags, check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from stabq.data.ids import is_ids, vocab_of
from stabq.data.labeled import validate_features
from stabq.errors import ConfigError, DataError
from stabq.model.classifier import BottleneckClassifier
from stabq.model.encoders import TOKEN_ENCODERS
from stabq.quantizers.base import Identity
from stabq.training import TrainConfig, train
from stabq.training.evaluation import forward_chunks

INFERENCE_CHUNK = 8192  # rows per forward pass at prediction
MIN_ROWS_TO_SPLIT = 10  # fewer rows (or a class of one row): validate on the training data


class DiscreteBottleneckClassifier(ClassifierMixin, TransformerMixin, BaseEstimator):
    """A scikit-learn classifier and transformer with a discrete bottleneck, over numpy arrays.

    `fit` trains a `BottleneckClassifier` (encoder, quantizer, head MLP) with
    `stabq.train`; `predict_proba` gives the softmax of its logits, `predict` the most
    likely label, and `transform` the discrete codes. It follows scikit-learn's
    conventions: the constructor only stores its arguments, everything learned ends in
    `_`, and the same `random_state` gives the same model. Import it from
    `stabq.estimator` (or as `stabq.DiscreteBottleneckClassifier`): scikit-learn is
    imported then, not with `stabq`.

    Args:
        quantizer: a preset name of `stabq.preset_names()`.
        encoder: `"mlp"` (`X` of shape `(n, d)`), `"cnn1d"` (`(n, L)` or `(n, C, L)`),
            `"cnn2d"` (`(n, C, H, W)`) or `"package.module:factory"`.
        hidden: width of the encoder's and the head's hidden layers.
        dropout: dropout after each hidden layer, in [0, 1).
        bottleneck_dim: size of the features handed to the quantizer.
        quantizer_options: a dict of options of the preset (`{"levels": [8, 5, 5]}`),
            or None.
        epochs: epochs to train (`TrainConfig.epochs`).
        batch_size: rows a step (`TrainConfig.batch_size`).
        lr: the peak learning rate (`TrainConfig.lr`).
        weight_decay: AdamW's weight decay (`TrainConfig.weight_decay`).
        two_stage: two-stage training (`TrainConfig.two_stage`).
        val_fraction: the share of rows held out for validation (`TrainConfig`); with
            fewer than 10 rows, or a class of one row, it validates on the training rows.
        random_state: None, an int or a `numpy.random.RandomState`; seeds the weights,
            the batch order and the validation split.
        device: the torch device to train and predict on (`"cpu"`, `"cuda"`, `"auto"`).
        verbose: show a progress bar while training.

    Attributes:
        classes_: `(n_classes,)` the sorted distinct labels (set by `fit`).
        n_features_in_: the number of features seen in `fit`.
        model_: the trained `BottleneckClassifier`, in eval mode.
        history_: the per-epoch rows of training (`TrainResult.history`).

    Raises:
        DataError: (at `fit`, `predict`, ...) input scikit-learn or stabq cannot use:
            not numbers, not finite, the wrong number of features, fewer than 2 classes.
        ConfigError: (at `fit`) `quantizer_options` not a dict, or an option the model
            refuses; (at `transform`) the continuous preset `none`, which has no codes.

    Examples:
        >>> import numpy as np
        >>> from stabq.estimator import DiscreteBottleneckClassifier
        >>> X = np.random.default_rng(0).normal(size=(120, 6)).astype("float32")
        >>> y = np.where(X[:, 0] > 0, "up", "down")
        >>> clf = DiscreteBottleneckClassifier("rvq", hidden=32, bottleneck_dim=16, epochs=2,
        ...                                    random_state=0).fit(X, y)
        >>> clf.classes_.tolist(), clf.predict(X[:3]).shape, clf.transform(X[:3]).shape
        (['down', 'up'], (3,), (3, 4))
        >>> clf.predict_proba(X[:3]).dtype
        dtype('float64')
    """

    def __init__(
        self,
        quantizer: str = "fsq",
        encoder: str = "mlp",
        hidden: int = 256,
        dropout: float = 0.1,
        bottleneck_dim: int = 128,
        quantizer_options: dict[str, Any] | None = None,
        epochs: int = 100,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        two_stage: bool = False,
        val_fraction: float = 0.1,
        random_state: int | np.random.RandomState | None = None,
        device: str = "cpu",
        verbose: bool = False,
    ) -> None:
        self.quantizer = quantizer
        self.encoder = encoder
        self.hidden = hidden
        self.dropout = dropout
        self.bottleneck_dim = bottleneck_dim
        self.quantizer_options = quantizer_options
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.two_stage = two_stage
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # transform returns int64 codes
        return tags

    def fit(self, X: Any, y: Any) -> DiscreteBottleneckClassifier:
        """Train on features and labels; returns `self`.

        Args:
            X: `(n, d)` finite numbers (`(n, ...)` for the CNN encoders).
            y: `(n,)` labels of any type scikit-learn allows (ints, strings, ...), at
                least 2 classes.

        Raises:
            DataError: `X` or `y` that cannot be used, or a single class.
            ConfigError: `quantizer_options` not a dict, or a model option refused.
        """
        X, y = self._validate(X, y, fit=True, dtype=np.float32)
        self.classes_, y_ids = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(
                f"y: 1 class ({str(self.classes_[0])!r}) in {len(y_ids)} rows: training a "
                "classifier needs labels of at least 2 classes"
            )
        options = {} if self.quantizer_options is None else self.quantizer_options
        if not isinstance(options, dict):
            raise ConfigError(f"quantizer_options={options!r}, allowed is a dict or None")
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        config = TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=seed,
            device=self.device,
            val_fraction=self.val_fraction,
            two_stage=self.two_stage,
            progress=bool(self.verbose),
        )
        data = (X, y_ids.astype(np.int64).reshape(-1))
        counts = np.bincount(data[1])
        val = data if len(y_ids) < MIN_ROWS_TO_SPLIT or counts.min() < 2 else None
        cuda = self.device != "cpu" and torch.cuda.is_available()
        devices = [torch.cuda.current_device()] if cuda else []
        with torch.random.fork_rng(devices=devices):  # the caller's torch RNG stays as it was
            torch.manual_seed(seed)
            model = BottleneckClassifier(
                X.shape[1:],
                len(self.classes_),
                self.quantizer,
                encoder=self.encoder,
                hidden=self.hidden,
                dropout=self.dropout,
                bottleneck_dim=self.bottleneck_dim,
                vocab_size=vocab_of(X),
                **options,
            )
            result = train(model, data, val=val, config=config)
        model.classes = [str(c) for c in self.classes_]
        self.model_ = result.model.eval()
        self.history_ = list(result.history)
        return self

    def _validate(self, X: Any, y: Any = None, *, fit: bool, dtype: type) -> Any:
        """``X`` (and at ``fit`` ``y``) as scikit-learn validates them, ``X`` also finite in
        ``dtype``; every problem is a :class:`DataError` (a ``ValueError``)."""
        wide = [np.float64, np.float32]  # no cast to float32 yet: overflow is reported below
        token = self.encoder in TOKEN_ENCODERS
        if token:  # token ids stay integers, as given
            wide = None
        nd = {"allow_nd": self.encoder != "mlp"}  # sequences and images for the CNNs
        try:
            if not fit:
                X = validate_data(self, X, reset=False, dtype=wide, ensure_all_finite=False, **nd)
            else:
                X, y = validate_data(self, X, y, dtype=wide, ensure_all_finite=False, **nd)
                check_classification_targets(y)
        except DataError:
            raise
        except ValueError as err:  # scikit-learn's messages, which its own checks match
            raise DataError(" ".join(str(err).split())) from err
        if token and not is_ids(X):
            raise DataError(f"X: {X.dtype} values, but encoder {self.encoder!r} takes token "
                            "ids: give X as integers")  # fmt: skip
        X = validate_features(X, "X", dtype, allow_nd=nd["allow_nd"])
        return (X, y) if fit else X

    @torch.no_grad()
    def _run(self, X: Any, codes: bool = False) -> torch.Tensor:
        """Logits ``(n, n_classes)`` float64, or with ``codes`` the indices, of validated ``X``.

        The eval-mode model runs in float64, in chunks: a row's result then does not
        depend on which other rows share its batch (float32 matrix products change in
        the last bits with the batch size, and scikit-learn checks that they do not).
        """
        check_is_fitted(self)
        X = self._validate(X, fit=False, dtype=np.float64)
        model = copy.deepcopy(self.model_).double().eval()
        chunks = forward_chunks(model, torch.from_numpy(X), INFERENCE_CHUNK)  # on its device
        return torch.cat([out.indices if codes else logits for logits, out in chunks])

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits `(n, n_classes)` float64; for 2 classes `(n,)`, the margin of `classes_[1]`
        (its logit minus that of `classes_[0]`).

        Args:
            X: features, as at `fit`.
        """
        logits = self._run(X)
        if logits.shape[1] == 2:
            logits = logits[:, 1] - logits[:, 0]
        return logits.cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities `(n, n_classes)` float64, columns in the order of `classes_`.

        Args:
            X: features, as at `fit`.
        """
        return torch.softmax(self._run(X), dim=-1).cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels `(n,)`, taken from `classes_`.

        Args:
            X: features, as at `fit`.
        """
        ids = self._run(X).argmax(dim=-1).cpu().numpy()
        return self.classes_[ids]

    def transform(self, X: Any) -> np.ndarray:
        """The discrete codes of `X`: `(n, num_codebooks)` int64.

        One column for a single codebook (FSQ, VQ, Gumbel, ...), one per codebook for
        RVQ, PQ and residual FSQ. `model_.logits_from_indices(codes)` decodes them
        (squeeze the last axis first for a single-codebook quantizer).

        Args:
            X: features, as at `fit`.

        Raises:
            ConfigError: the preset is `none`, which has no codes.
        """
        check_is_fitted(self)
        if isinstance(self.model_.quantizer, Identity):
            raise ConfigError(
                f"quantizer={self.quantizer!r} is continuous and has no discrete codes to "
                "transform to; choose a quantizer such as 'fsq' or 'rvq'"
            )
        indices = self._run(X, codes=True)
        return indices.reshape(indices.shape[0], -1).to(torch.int64).cpu().numpy()
