from ray_jobs.preprocess import main

if __name__ == "__main__":
    main()
