"""Base config for CIFAR-10 (32x32x3); variants under ve/, vp/, subvp/ start from it.

Not run directly. Its values are the VE NCSN++ continuous setup, so the run
python main.py --mode=train --config=configs/ve/cifar10_ncsnpp_continuous.py \
--workdir=workdir/ve_cifar10_ncsnpp_continuous
trains exactly this config (paper: FID 2.38 / IS 9.83, PC sampler, 2000 NFE).

Every key any variant touches is defined here, with a comment where its meaning is not obvious,
so configs can be locked (`ml_collections` rejects unknown keys) and typos fail loudly.
"""

import ml_collections


def get_default_configs() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.training = _training()
    config.sampling = _sampling()
    config.eval = _eval()
    config.sample = _sample()
    config.controllable = _controllable()
    config.classifier = _classifier()
    config.data = _data()
    config.model = _model()
    config.optim = _optim()
    config.pretrained = _pretrained()
    config.data_stats = _data_stats()
    config.seed = 42
    # Comma-separated Python files or module names imported before the config is validated
    # (a researcher's SDE, sampler, network, ...: docs/extending.md); recorded in the workdir's
    # config.json, so later modes and resumed runs import them again.
    config.plugins = ""
    return config


def _training() -> ml_collections.ConfigDict:
    training = ml_collections.ConfigDict()
    training.sde = "vesde"  # 'vesde' | 'vpsde' | 'subvpsde' | a plugin's (sde_lib.register_sde)
    training.continuous = True  # False: SMLD / DDPM discrete-noise objectives
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    # Extra checkpoints (overwritten) so a pre-empted cloud job loses little work.
    training.snapshot_freq_for_preemption = 10000
    training.snapshot_sampling = True  # write a sample grid at every snapshot
    training.likelihood_weighting = False
    # Times t of the continuous objective: 'uniform' on [eps, T] (the paper) | 'lognormal':
    # EDM's ln(sigma / alpha) ~ N(p_mean, p_std^2) (losses.sample_times).
    training.time_distribution = "uniform"
    training.p_mean = -1.2
    training.p_std = 1.2
    # With model.parameterization='edm': EDM's loss weight (True) or the paper's lambda = std^2.
    training.edm_weight = True
    training.n_jitted_steps = 5  # optimizer steps fused in one jitted lax.scan call
    training.reduce_mean = False  # loss: mean over pixels if True, else 0.5 * sum
    training.max_ckpts_to_keep = 0  # 0 keeps every snapshot
    # 'float32' | 'bfloat16': operands of the network's convolutions and matrix products;
    # parameters, optimizer state, EMA and loss stay float32 (models.precision).
    training.precision = "float32"
    # Rematerialize every residual / attention block in the backward pass: less activation
    # memory (for 256 / 1024 px models) for about one more forward pass of compute.
    training.remat = False
    # Persistent XLA compilation cache, so a restarted run loads its compiled programs:
    # 'auto' = $SCORE_SDE_CACHE/xla, else ~/.cache/score_sde/xla; '' turns it off; any other
    # value is the folder. JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
    training.compile_cache_dir = "auto"
    return training


def _sampling() -> ml_collections.ConfigDict:
    sampling = ml_collections.ConfigDict()
    # 'pc' | 'ode' | 'ddim' | 'dpm_solver' | 'heun' | 'sde_dpm_solver' | 'unipc' | 'ipndm'
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.n_steps_each = 1  # corrector steps per noise level
    sampling.noise_removal = True  # final denoising step
    sampling.probability_flow = False
    sampling.snr = 0.16
    sampling.ode_method = "dopri5"  # 'dopri5' (on device, diffrax) | 'scipy_rk45' (paper)
    sampling.ode_rtol = 1e-5
    sampling.ode_atol = 1e-5
    # Few-step samplers (fast_samplers.py; 'noise_removal' adds a final x0 prediction, 1 NFE).
    sampling.num_steps = 20  # steps from T to eps: NFE = num_steps ('heun': 2 num_steps)
    sampling.schedule = "default"  # 'logsnr' | 'time_uniform' | 'time_quadratic' | 'karras'
    sampling.rho = 7.0  # exponent of the 'karras' schedule (EDM)
    # Multistep order: 'dpm_solver' 1-3 (2 = DPM-Solver++ 2M), 'sde_dpm_solver' 1-2,
    # 'unipc' 1-3 (UniPC-p, order p + 1 with its corrector), 'ipndm' 1-4 (the published is 4)
    sampling.order = 2
    sampling.eta = 0.0  # 'ddim': 0 deterministic, 1 DDPM-like noise
    sampling.churn = 0.0  # 'heun': EDM's S_churn (0 = deterministic)
    sampling.unipc_variant = "bh2"  # 'unipc': B(h) = e^{-h} - 1 ('bh2') or -h ('bh1')
    sampling.ipndm_variable_steps = False  # 'ipndm': Adams-Bashforth weights for unequal steps
    # Every data prediction of the few-step samplers: 'none' | 'clip' (to the data range) |
    # 'dynamic' (Imagen's dynamic thresholding at the threshold_percentile quantile)
    sampling.thresholding = "none"
    sampling.threshold_percentile = 0.995
    return sampling


def _eval() -> ml_collections.ConfigDict:
    evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = "test"  # 'train' | 'test'
    evaluate.bpd_num_repeats = 5  # passes over the dataset averaged for bits/dim
    evaluate.inception_weights = ""  # local pytorch-fid .pth; '' = cache, download once
    # Fast FID across a checkpoint range: score every checkpoint on only
    # `fast_fid_num_samples` samples (noisier, much cheaper) instead of `num_samples`.
    evaluate.fast_fid = False
    evaluate.fast_fid_num_samples = 1000
    evaluate.num_bpd_batches = 0  # bits/dim on this many batches per pass; 0 = all
    # How long to wait for a checkpoint not written yet; -1: up to 24 h while a training run is
    # writing to the workdir, not at all otherwise.
    evaluate.ckpt_wait_secs = -1
    evaluate.stats_dir = "assets/stats"  # dataset Inception statistics (--mode=fid_stats)
    evaluate.show_progress = True  # progress bars on long sampling / evaluation loops
    return evaluate


def _sample() -> ml_collections.ConfigDict:
    """--mode=sample | inpaint | colorize | conditional | likelihood (run_lib.generate)."""
    sample = ml_collections.ConfigDict()
    sample.ckpt = 0  # the checkpoint_<k> these modes load; 0 = the newest
    sample.num_samples = 64  # images --mode=sample and --mode=conditional write
    # Output folder, relative to the workdir or absolute; '' = <workdir>/<mode>/ckpt_<k>.
    sample.out = ""
    sample.grid_size = 64  # images shown in a mode's summary grid (PNG)
    return sample


def _controllable() -> ml_collections.ConfigDict:
    """Inputs and masks of --mode=inpaint | colorize | likelihood | encode | interpolate;
    guidance of conditional; decode reads the latents.npz of --mode=encode from `source`."""
    controllable = ml_collections.ConfigDict()
    # 'test' | 'train' (dataset split), or a folder of PNG/JPEG images or an .npz file
    controllable.source = "test"
    controllable.num_inputs = 64  # images read from the source; 0 = all of a folder / .npz
    controllable.mask = "half"  # 'half' | 'box' | 'random' | 'file': what inpainting fills in
    controllable.half = "lower"  # mask='half': 'lower' | 'upper' | 'left' | 'right'
    controllable.box = "center"  # mask='box': 'center' (half the side) or 'top,left,height,width'
    controllable.rate = 0.5  # mask='random': fraction of pixels to fill in
    # mask='file': an image (or .npz: one mask, or one per input) whose white pixels are filled
    controllable.mask_path = ""
    controllable.samples_per_input = 1
    controllable.labels = "all"  # conditional: 'all' (classes in turn) or ids, e.g. '3' or '0,5,7'
    controllable.scale = 1.0  # classifier guidance scale; 1 = the conditional score of Eq. 14
    # --mode=encode | decode | interpolate: latents are multiplied by this before decoding
    controllable.temperature = 1.0
    controllable.interpolation_steps = 8  # interpolate: images per pair, both ends included
    return controllable


def _classifier() -> ml_collections.ConfigDict:
    """The noise-conditional classifier of class-conditional sampling (App. I.1): WRN-28-10."""
    classifier = ml_collections.ConfigDict()
    classifier.blocks_per_group = 4  # WRN-(6 blocks_per_group + 4)-(channel_multiplier)
    classifier.channel_multiplier = 10
    classifier.num_classes = 10
    classifier.input_normalization = "none"  # 'none' | 'cifar10' (the reference's classifier)
    # --mode=conditional loads: '' = <workdir>/classifier (newest), a classifier folder or
    # checkpoint_<k> folder of this project, or a flax msgpack params file (the reference's)
    classifier.path = ""
    classifier.batch_size = 128
    classifier.n_iters = 100000
    classifier.lr = 2e-4
    classifier.warmup = 1000
    classifier.weight_decay = 0.0
    classifier.grad_clip = 1.0  # negative disables it
    classifier.label_smoothing = 0.0  # a in targets (1 - a) one-hot + a / num_classes
    classifier.lr_decay = "none"  # 'none' | 'cosine': to 0 at classifier.n_iters (optim.lr_decay)
    classifier.snapshot_freq = 10000
    classifier.log_freq = 100
    classifier.eval_freq = 2000
    classifier.eval_times = (0.0, 0.25, 0.5, 0.75, 1.0)  # accuracy at these t (0 means eps)
    classifier.eval_batches = 4  # test batches (classifier.batch_size) per evaluation
    return classifier


def _data() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.num_channels = 3
    data.random_flip = True
    data.centered = False  # True: scale data to [-1, 1] instead of [0, 1]
    data.uniform_dequantization = False
    data.data_dir = ""  # local IDX/TFRecord directory or tfds data_dir; '' = tfds default
    data.download = False  # let tfds download and prepare a missing data set (needs internet)
    data.tfrecords_path = ""  # FFHQ / CelebA-HQ TFRecord file
    data.category = ""  # LSUN category, e.g. 'bedroom' or 'church_outdoor'
    # dataset='folder' (images under data_dir, or an .npz; docs/data.md): the evaluation split
    # is the folder eval_dir, else the held-out fraction eval_fraction of data_dir, else data_dir
    data.eval_dir = ""
    data.eval_fraction = 0.0
    # decoded-image cache of 'folder'; '' = <workdir>/data_cache
    data.cache_dir = ""
    data.eval_split = ""  # dataset='tfds:<name>': its evaluation split; '' = test or validation
    return data


def _model() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.sigma_min = 0.01
    model.sigma_max = 50.0
    model.num_scales = 1000  # N: SDE discretization steps; NCSN(v2): one class per level
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"  # 'fourier' | 'positional'
    model.fourier_scale = 16
    model.scale_by_sigma = True
    # 'eps': the paper's output conventions (score_model) | 'edm': EDM's preconditioning and
    # loss weight against the marginal (continuous only; sigma_data: the data's std).
    model.parameterization = "eps"
    model.sigma_data = 0.5
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"  # 'biggan' | 'ddpm'
    model.progressive = "none"  # 'none' | 'output_skip' | 'residual'
    model.progressive_input = "residual"  # 'none' | 'input_skip' | 'residual'
    model.progressive_combine = "sum"  # 'sum' | 'cat'
    model.init_scale = 0.0
    model.interpolation = "bilinear"  # NCSN / NCSNv2 upsampling
    return model


def _optim() -> ml_collections.ConfigDict:
    optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000  # linear learning-rate warmup steps
    optim.grad_clip = 1.0  # global-norm clipping; negative disables it
    optim.lr_decay = "none"  # 'none' (the reference) | 'cosine': to 0 at training.n_iters
    return optim


def _pretrained() -> ml_collections.ConfigDict:
    """Released checkpoints (main.py --mode=import / export; see docs/pretrained.md)."""
    pretrained = ml_collections.ConfigDict()
    pretrained.path = ""  # score_sde checkpoint_<k>, score_sde_pytorch .pth or diffusers folder
    # import: the checkpoint_<k> to write (0: k from the source's step); export: the one to
    # read (0: the newest).
    pretrained.ckpt = 0
    # export: the diffusers folder or .pth file to write ('' = <workdir>/diffusers, or
    # <workdir>/score_sde_pytorch/checkpoint_<k>.pth)
    pretrained.out = ""
    pretrained.format = "diffusers"  # export: 'diffusers' | 'score_sde_pytorch'
    return pretrained


def _data_stats() -> ml_collections.ConfigDict:
    """--mode=data_stats: NCSNv2's sigma_max, num_scales and snr for the data set."""
    data_stats = ml_collections.ConfigDict()
    # sigma_max is exact over this many training images, a lower bound beyond
    data_stats.max_images = 10000
    return data_stats
