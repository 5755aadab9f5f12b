from camelid.cli import main

main()
