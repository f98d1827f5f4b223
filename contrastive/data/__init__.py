"""Data-loading pieces shared by the datamodules of every setting: resumable, seeded batch samplers
(:mod:`.resumable`)."""
