// seq_aux: placeholder, to be written
#pragma once
