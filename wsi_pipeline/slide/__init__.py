"""Slides and cohorts: one reader over OpenSlide and TiffSlide (`reader`), the validated sample sheet (`cohort`)."""
