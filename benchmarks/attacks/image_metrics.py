"""Image similarity metrics for scoring reconstructions: PSNR and SSIM."""

import math

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

# Constants of the SSIM index as defined by Wang, Bovik, Sheikh and Simoncelli,
# "Image Quality Assessment: From Error Visibility to Structural Similarity",
# IEEE Transactions on Image Processing 13(4), 2004.
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

FloatArray = npt.NDArray[np.float64]


def psnr(
    reference: npt.ArrayLike,
    reconstruction: npt.ArrayLike,
    *,
    data_range: float,
) -> float:
    """Compute the peak signal-to-noise ratio in decibels.

    PSNR = 10 * log10(data_range**2 / MSE), where MSE is the mean squared error
    over all elements.

    Args:
        reference: The original image, any shape.
        reconstruction: The image to score, the same shape as ``reference``.
        data_range: The difference between the largest and the smallest value
            the pixel type can take, for example 1.0 for images in [0, 1].

    Returns:
        The PSNR in dB. Identical images have an MSE of 0 and return ``math.inf``.

    Raises:
        ValueError: If the shapes differ or ``data_range`` is not positive.

    """
    reference_array, reconstruction_array = _validate_pair(
        reference, reconstruction, data_range=data_range
    )

    mse = float(np.mean((reference_array - reconstruction_array) ** 2))

    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(
    reference: npt.ArrayLike,
    reconstruction: npt.ArrayLike,
    *,
    data_range: float,
) -> float:
    """Compute the mean structural similarity index (Wang et al. 2004).

    Local means, variances and the covariance are weighted by a Gaussian window
    of 11 x 11 pixels with standard deviation 1.5, and the stabilizing constants
    are C1 = (0.01 * data_range)**2 and C2 = (0.03 * data_range)**2, as in the
    paper. The SSIM map is averaged over the positions where the whole window
    fits inside the image, so a border of 5 pixels is left out. A multi-channel
    image of shape (channels, height, width) gets the mean over its channels.

    Args:
        reference: The original image, of shape (height, width) or
            (channels, height, width).
        reconstruction: The image to score, the same shape as ``reference``.
        data_range: The difference between the largest and the smallest value
            the pixel type can take, for example 1.0 for images in [0, 1].

    Returns:
        The mean SSIM, 1.0 for identical images and at most 1.0 otherwise.

    Raises:
        ValueError: If the shapes differ, ``data_range`` is not positive, the
            image is not 2-D or 3-D, or a side is shorter than 11 pixels.

    """
    reference_array, reconstruction_array = _validate_pair(
        reference, reconstruction, data_range=data_range
    )
    if reference_array.ndim not in (2, 3):
        raise ValueError(
            "reference must have shape (height, width) or (channels, height, "
            f"width). Found shape {reference_array.shape}."
        )
    if min(reference_array.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"Image height and width must be at least {SSIM_WINDOW_SIZE} pixels "
            f"for the SSIM window. Found shape {reference_array.shape}."
        )

    if reference_array.ndim == 2:
        return _ssim_single_channel(
            reference_array, reconstruction_array, data_range=data_range
        )
    channel_values = [
        _ssim_single_channel(
            reference_channel, reconstruction_channel, data_range=data_range
        )
        for reference_channel, reconstruction_channel in zip(
            reference_array, reconstruction_array, strict=True
        )
    ]
    return float(np.mean(channel_values))


def _validate_pair(
    reference: npt.ArrayLike,
    reconstruction: npt.ArrayLike,
    *,
    data_range: float,
) -> tuple[FloatArray, FloatArray]:
    reference_array = np.asarray(reference, dtype=np.float64)
    reconstruction_array = np.asarray(reconstruction, dtype=np.float64)
    if reference_array.shape != reconstruction_array.shape:
        raise ValueError(
            "reconstruction must have the shape of reference. Found "
            f"{reconstruction_array.shape} and {reference_array.shape}."
        )
    if not data_range > 0.0:
        raise ValueError(f"data_range must be positive. Found {data_range}.")
    return reference_array, reconstruction_array


def _gaussian_window_mean(image: FloatArray) -> FloatArray:
    # gaussian_filter extends the kernel to truncate * sigma on each side, so
    # this truncation gives a kernel of exactly SSIM_WINDOW_SIZE taps.
    radius = (SSIM_WINDOW_SIZE - 1) // 2
    filtered: FloatArray = gaussian_filter(
        image, sigma=SSIM_SIGMA, truncate=radius / SSIM_SIGMA, mode="reflect"
    )
    return filtered[radius:-radius, radius:-radius]


def _ssim_single_channel(
    reference: FloatArray, reconstruction: FloatArray, *, data_range: float
) -> float:
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    mean_x = _gaussian_window_mean(reference)
    mean_y = _gaussian_window_mean(reconstruction)
    variance_x = _gaussian_window_mean(reference * reference) - mean_x**2
    variance_y = _gaussian_window_mean(reconstruction * reconstruction) - mean_y**2
    covariance = _gaussian_window_mean(reference * reconstruction) - mean_x * mean_y

    luminance = (2.0 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    contrast_structure = (2.0 * covariance + c2) / (variance_x + variance_y + c2)
    return float(np.mean(luminance * contrast_structure))
