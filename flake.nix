{
  # nix develop              a shell with Python 3.11, Redis and PostgreSQL on PATH and the project
  #                          installed with its test extras in .venv; `python -m pytest` there
  #                          starts redis-server and PostgreSQL by itself (see README, Tests)
  # nix run .#worker         python -m instaqueue worker (extra arguments go to celery)
  # nix run .#beat           python -m instaqueue beat
  # Both apps run in the checkout and use (or make) its .venv, as the shell does.
  description = "instaqueue: Celery + Redis + PostgreSQL job engine (development shell, worker and beat)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # What the shell and the apps share.
      common = pkgs: rec {
        python = pkgs.python311;

        # PyPI's manylinux wheels (pydantic-core, psycopg-binary, ...) expect libstdc++ and zlib
        # from the system, which NixOS does not provide at the usual places.
        libraryPath = pkgs.lib.optionalString pkgs.stdenv.isLinux
          (pkgs.lib.makeLibraryPath [ pkgs.stdenv.cc.cc.lib pkgs.zlib ]);

        # instaqueue_venv: in the checkout, make .venv with this Python (again when another
        # Python made it) and install the project with its test extras when pyproject.toml is
        # newer than the last install.
        venvFunction = ''
          instaqueue_venv() {
            if ! grep -qs '^name = "instaqueue"' pyproject.toml; then
              echo "instaqueue: run this in the instaqueue checkout (the folder with pyproject.toml)" >&2
              return 1
            fi
            local python="${python}/bin/python3.11"
            if [ "$(cat .venv/.nix-python 2>/dev/null)" != "$python" ]; then
              if [ -e .venv ]; then
                echo "instaqueue: .venv was made by another Python; making it again with $python" >&2
              fi
              rm -rf .venv
              "$python" -m venv .venv || return 1
              echo "$python" > .venv/.nix-python
            fi
            if [ ! -e .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
              echo "instaqueue: pip install -e '.[test]' into .venv" >&2
              .venv/bin/python -m pip install --quiet --upgrade pip || return 1
              .venv/bin/python -m pip install --quiet -e '.[test]' || return 1
              touch .venv/.installed
            fi
          }
        '';
      };
    in
    {
      devShells = forAllSystems (pkgs:
        let c = common pkgs; in
        {
          default = pkgs.mkShell ({
            packages = [
              c.python
              c.python.pkgs.pip
              c.python.pkgs.virtualenv
              pkgs.redis            # redis-server, redis-cli: the tests start their own
              pkgs.postgresql_16    # initdb, pg_ctl, psql: the tests start their own
              pkgs.git
            ] ++ pkgs.lib.optional (pkgs ? check-jsonschema) pkgs.check-jsonschema;

            shellHook = ''
              ${c.venvFunction}
              if instaqueue_venv; then
                # shellcheck disable=SC1091
                source .venv/bin/activate
                echo "instaqueue: .venv active; python -m pytest runs the tests (Redis and PostgreSQL from PATH)"
              fi
            '';
          } // pkgs.lib.optionalAttrs pkgs.stdenv.isLinux {
            LD_LIBRARY_PATH = c.libraryPath;
          });
        });

      apps = forAllSystems (pkgs:
        let
          c = common pkgs;
          app = command: {
            type = "app";
            meta.description = "python -m instaqueue ${command}, from the checkout's .venv";
            program = "${pkgs.writeShellApplication {
              name = "instaqueue-${command}";
              runtimeInputs = [ c.python pkgs.coreutils pkgs.gnugrep ];
              text = ''
                ${c.venvFunction}
                instaqueue_venv
                ${pkgs.lib.optionalString pkgs.stdenv.isLinux ''
                  export LD_LIBRARY_PATH="${c.libraryPath}''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
                ''}
                exec .venv/bin/python -m instaqueue ${command} "$@"
              '';
            }}/bin/instaqueue-${command}";
          };
        in
        {
          worker = app "worker";
          beat = app "beat";
        });
    };
}
