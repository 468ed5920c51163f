"""The overrides every test's tiny training run shares: the smallest network, no periodic sample grids, a 4-sample
end-of-run grid and no training.png (the grid and the plot cost ~1 s a run; the tests that check them set them back)."""

TINY_RUN = ["network.name=unet-tiny", "logging.sample_every_steps=0", "logging.grid_size=4", "logging.plot=false"]
