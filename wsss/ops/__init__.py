"""Operations below the methods: dense CRF."""
