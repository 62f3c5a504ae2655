"""Guest images: recipes built from Debian's packages into a content-addressed cache."""
